"""Run order only: embed -> index -> find neighbours -> cluster -> rank -> write manifests -> report.

Each stage reads the previous stage's files from the run directory and writes
its own; this module chains them and resumes wherever a stage's outputs
already exist. Stage logic lives in `dedup/stages/`, printing in `dedup/console.py`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
from rich.console import Console

from dedup.console import print_embed_summary
from dedup.records import RunDir
from dedup.stages.cluster import cluster
from dedup.stages.embed import EmbedOptions, embed, resolve_workers
from dedup.stages.index import build_indexes, faiss_gpu_available, index_stale
from dedup.stages.manifests import manifests_stage
from dedup.stages.neighbors import clear_stage, find_neighbors
from dedup.stages.rank import rank

__all__ = ["EmbedOptions", "build_indexes", "cluster", "embed", "find_neighbors", "rank", "resolve_workers", "run_all"]


def run_all(shard_specs: list[str], out: str | Path, options: EmbedOptions, thresholds: list[str] | None,
            memory: str, keep: str, with_report: bool, log: Console) -> pd.DataFrame:
    """`dedup run`: every stage in order, skipping finished work, so a rerun after a crash resumes; returns the ranking."""
    started = time.perf_counter()
    report = embed(shard_specs, out, options, log)
    print_embed_summary(report, log)
    run = RunDir(out)
    gpu = faiss_gpu_available()
    if index_stale(run):
        for name, spec in build_indexes(out, memory, gpu=gpu).items():
            clear_stage(run, f"neighbors-{name}", run.neighbors_dir(name))  # edges of the old index
            log.print(f"index {name}: {spec.kind} ({spec.factory}) over {spec.n_vectors:,} vectors")
    find_neighbors(out, thresholds, gpu=gpu, show_progress=options.show_progress,
                   engine=options.engine, ray_address=options.ray_address)
    stats = cluster(out, thresholds)
    log.print(f"clusters: {stats}")
    ranking = rank(out)
    log.print(f"manifests: {manifests_stage(out, keep)}")
    if with_report:
        from dedup.stages.report import write_report

        log.print(f"report: {write_report(out)}")
    log.print(f"done in {time.perf_counter() - started:.1f}s")
    return ranking
