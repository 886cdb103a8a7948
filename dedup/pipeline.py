"""Run order only: embed -> index -> find neighbours -> cluster -> rank -> write manifests -> report.

Each stage reads the previous stage's files from the run directory and writes
its own, behind the run's engine (markers, retries, stats, progress); a stage
whose inputs and settings are unchanged is skipped, so `run_all` resumes
wherever it stopped. Stage logic lives in `dedup/stages/`, printing in
`dedup/console.py`, settings in `dedup/settings.py`.
"""

from __future__ import annotations

import time

import pandas as pd

from dedup.console import print_embed_summary
from dedup.run import Run
from dedup.search.faiss_index import faiss_backend
from dedup.stages.cluster import cluster
from dedup.stages.crops import find_crops
from dedup.stages.embed import embed
from dedup.stages.increment import build_indexes
from dedup.stages.index import faiss_gpu_available
from dedup.stages.manifests import manifests_stage
from dedup.stages.neighbors import find_neighbors
from dedup.stages.rank import rank

__all__ = ["build_indexes", "cluster", "embed", "find_neighbors", "manifests_stage", "rank", "run_all",
           "run_from_embeddings"]


def run_all(run: Run, with_report: bool = True, top: int = 50) -> pd.DataFrame:
    """Every stage in order on one run context, from shards; returns the ranking."""
    started = time.perf_counter()
    report = embed(run)
    if run.console is not None:
        print_embed_summary(report, run.console)
    if run.settings.embeddings is not None:  # `dedup run SHARDS --embeddings DIR`
        from dedup.stages.precomputed_join import attach_precomputed

        run.log(f"precomputed vectors from {run.settings.embeddings}: {attach_precomputed(run)}")
    return _from_vectors(run, with_report, top, started)


def run_from_embeddings(run: Run, with_report: bool = True, top: int = 50) -> pd.DataFrame:
    """`dedup run --embeddings DIR`: ingest precomputed vectors (no images), then the same stages as `run_all`."""
    from dedup.stages.precomputed import ingest_embeddings, write_url_remove_list

    started = time.perf_counter()
    report = ingest_embeddings(run, run.settings.shard_specs[0])
    run.log(f"ingest: {int(report.stats.get('samples', 0)):,} vectors from {report.tasks_total} parts")
    ranking = _from_vectors(run, with_report, top, started, after_manifests=write_url_remove_list)
    return ranking


def _from_vectors(run: Run, with_report: bool, top: int, started: float, after_manifests=None) -> pd.DataFrame:
    """index -> neighbours -> cluster -> rank -> manifests -> report, each behind the engine."""
    gpu = faiss_gpu_available()
    run.log(f"faiss: {faiss_backend()}")
    for name, spec in build_indexes(run, gpu=gpu).items():
        run.log(f"index {name}: {spec.kind} ({spec.factory}) over {spec.n_vectors:,} vectors")
    find_neighbors(run, gpu=gpu)
    run.log(f"crops: {find_crops(run)}")
    run.log(f"clusters: {cluster(run)}")
    ranking = rank(run)
    run.log(f"manifests: {manifests_stage(run)}")
    if after_manifests is not None:  # runs from precomputed embeddings: the remove list by url
        run.log(f"remove list by url: {after_manifests(run):,} rows")
    if with_report:
        from dedup.stages.report import report_stage

        run.log(f"report: {report_stage(run, top=top)}")
    run.log(f"done in {time.perf_counter() - started:.1f}s")
    return ranking
