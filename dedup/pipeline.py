"""Run order: embed -> index -> find neighbours -> cluster -> rank -> write manifests -> report.

Each function reads the previous stage's files from the run directory and
writes its own; `run_all` chains them and resumes wherever a stage's outputs
already exist.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table
from rich.text import Text

from dedup import config as cfg
from dedup.descriptors import DescriptorBuilder, choose_default_descriptors, vector_descriptor_names
from dedup.engine import StageReport, make_engine
from dedup.errors import DedupError, StoreError
from dedup.store import RunDir, load_embeddings, load_samples, record_shards, remove_stale_temp_files, write_table


@dataclass
class EmbedOptions:
    descriptors: list[str] = field(default_factory=list)
    clip_model: str = "ViT-B-32"
    clip_pretrained: str = "laion2b_s34b_b79k"
    device: str = "auto"
    batch_size: int = 64
    workers: int | None = None  # None: chosen by resolve_workers
    engine: str = "local"
    ray_address: str | None = None
    show_progress: bool = True


# ---------------------------------------------------------------- embed


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_descriptors(options: EmbedOptions, log: Console | None = None) -> list[str]:
    if options.descriptors:
        names = list(dict.fromkeys(options.descriptors))
        reason = "chosen with --descriptor"
        unknown = [n for n in names if n not in vector_descriptor_names()]
        if unknown:
            raise DedupError(
                f"unknown descriptor {unknown[0]!r}",
                hint=f"choose from {', '.join(vector_descriptor_names())} (sha256 is always computed); 'dedup descriptors' lists them",
            )
    else:
        names, reason = choose_default_descriptors(_cuda_available())
    if log is not None:
        log.print(f"descriptors: {', '.join(names)} ({reason})")
    return names


def resolve_workers(options: EmbedOptions, names: list[str]) -> int:
    """Decode processes: one per core, except that CLIP on a CPU needs every core for the model.

    Measured on 2 cores (benchmarks/bench_embed.py, ViT-B-32): decode+prepare
    costs ~5% of the CPU forward pass; decoding inline reaches 0.95 of the bare
    model rate, one decode process 0.73 (it preempts torch's threads).
    """
    if options.workers is not None:
        return options.workers
    cores = os.cpu_count() or 1
    clip_on_cpu = "clip" in names and (options.device == "cpu" or (options.device == "auto" and not _cuda_available()))
    return 0 if clip_on_cpu else cores


def descriptor_builders(names: list[str], options: EmbedOptions) -> list[DescriptorBuilder]:
    builders = []
    for name in names:
        opts: dict[str, Any] = {}
        if name == "clip":
            opts = {"model": options.clip_model, "pretrained": options.clip_pretrained, "device": options.device}
        builders.append(DescriptorBuilder(name, opts))
    return builders


def embed(shard_specs: list[str], out: str | Path, options: EmbedOptions, log: Console | None = None) -> StageReport:
    from dedup.data_manifest import expand_inputs
    from dedup.embed import EmbedStage

    run = RunDir(out)
    remove_stale_temp_files(run)
    shards = expand_inputs(shard_specs)
    names = resolve_descriptors(options, log)
    config = _start_config(run, shard_specs, names, options)
    record_shards(run, shards)
    builders = descriptor_builders(names, options)
    _check_builders(builders, log)
    workers = resolve_workers(options, names)
    if log is not None:
        log.print(f"decode workers: {workers}")
    stage = EmbedStage(run, shards, builders, workers=workers, batch_size=options.batch_size)
    engine = make_engine(options.engine, run, show_progress=options.show_progress, ray_address=options.ray_address)
    report = engine.run(stage)
    config.save(run)
    return report


def _start_config(run: RunDir, shard_specs: list[str], names: list[str], options: EmbedOptions) -> cfg.RunConfig:
    if run.run_config.exists():
        config = cfg.RunConfig.load(run)
        if config.descriptors != names:
            raise StoreError(
                f"{run.root} was embedded with {config.descriptors}, not {names}",
                hint="resume with the same --descriptor list, or use a new --out directory",
            )
        return config
    config = cfg.RunConfig(shard_specs=list(shard_specs), descriptors=names)
    config.descriptor_options = {b.name: b.options for b in descriptor_builders(names, options)}
    config.fill_defaults().save(run)
    return config


def _check_builders(builders: list[DescriptorBuilder], log: Console | None) -> None:
    """Build each descriptor once up front so a bad model name fails before any shard is read."""
    from dedup.worker import cached_descriptor

    for builder in builders:
        descriptor = cached_descriptor(builder)
        if builder.name == "clip":
            # One tiny forward pass loads the weights: a bad checkpoint fails here, not mid-shard.
            side = descriptor.min_side
            descriptor.embed(np.zeros((1, 3, side, side), dtype=np.uint8))
        if log is not None and hasattr(descriptor, "describe_device"):
            log.print(f"{builder.name}: {descriptor.describe_device()}")


def print_embed_summary(report: StageReport, console: Console) -> None:
    stats = report.stats
    failed = {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("status.") and k != "status.ok"}
    console.print(
        f"embed: {int(stats.get('samples', 0)):,} samples, {int(stats.get('status.ok', 0)):,} ok, "
        f"failed {sum(failed.values()):,} {dict(sorted(failed.items()))}, "
        f"{report.tasks_run} shards run, {report.tasks_skipped} already done, {report.seconds:.1f}s"
    )


# ---------------------------------------------------------------- index


def build_indexes(out: str | Path, memory: str = "8GB", gpu: bool = False) -> dict[str, Any]:
    from dedup.index import build_index, choose_index, save_index

    run = RunDir(out)
    config = cfg.RunConfig.load(run)
    budget = cfg.parse_size(memory)
    specs = {}
    for name in config.descriptors:
        ids, vectors = load_embeddings(run, name)
        transform = query_transform_for(name)
        variants = len(transform(vectors[:1])) if transform is not None else 1
        spec = choose_index(len(vectors), vectors.shape[1], budget, gpu=gpu, query_variants=variants)
        index = build_index(spec, vectors)
        save_index(index, spec, run.index_dir, name)
        specs[name] = spec
    return specs


# ---------------------------------------------------------------- neighbours


class NeighborsStage:
    """All-vs-all range search in row blocks; block j's edges -> neighbors/<descriptor>/part_{j}.parquet.

    Rows are the descriptor's vectors in sample_id order, so block boundaries
    are stable and a killed search resumes at the first unfinished block.
    """

    def __init__(self, run: RunDir, descriptor: str, threshold: float, knn_cap: int | None = None,
                 rows_per_task: int = 65536) -> None:
        self.run_dir, self.descriptor, self.threshold, self.knn_cap = run, descriptor, threshold, knn_cap
        self.rows_per_task = rows_per_task
        self.name = f"neighbors-{descriptor}"
        self._loaded = None

    def __getstate__(self):
        return {**self.__dict__, "_loaded": None}

    def _load(self):
        if self._loaded is None:
            from dedup.index import load_index

            index, spec = load_index(self.run_dir.index_dir, self.descriptor)
            ids, vectors = load_embeddings(self.run_dir, self.descriptor)
            keys = load_samples(self.run_dir, ["sample_id", "key"]).set_index("sample_id")["key"]
            self._loaded = (index, ids, vectors, keys)
        return self._loaded

    def task_ids(self) -> list[str]:
        from dedup.store import embedding_parts

        if self._uses_ivf_join():
            return ["0"]
        rows = sum(len(np.load(self.run_dir.embedding_part(self.descriptor, p), mmap_mode="r"))
                   for p in embedding_parts(self.run_dir, self.descriptor))
        return [str(j) for j in range(max(1, -(-rows // self.rows_per_task)))]

    def _uses_ivf_join(self) -> bool:
        # IVF-Flat on CPU: the BLAS cell join is ~2.5x faster than per-query range search
        # (benchmarks/bench_graph.py, 1e6 vectors: 227 s vs 570 s) but runs as one task.
        from dedup.index import IndexSpec

        spec_file = self.run_dir.index_dir / f"{self.descriptor}.json"
        spec = IndexSpec.from_json(spec_file.read_text()) if spec_file.exists() else None
        return spec is not None and spec.kind == "ivf_flat" and not spec.use_gpu and self.knn_cap is None

    def run_task(self, task_id: str, progress) -> dict[str, Any]:
        from dedup.neighbors import find_pairs, find_pairs_ivf_join

        index, ids, vectors, keys = self._load()
        transform = query_transform_for(self.descriptor)
        if self._uses_ivf_join():
            rows = slice(0, len(vectors))
            found = list(find_pairs_ivf_join(index, vectors, ids, self.threshold, query_transform=transform))
            progress(len(vectors))
        else:
            start = int(task_id) * self.rows_per_task
            rows = slice(start, min(start + self.rows_per_task, len(vectors)))
            found = list(find_pairs(index, vectors, ids, self.threshold, query_transform=transform,
                                    knn_cap=self.knn_cap, rows=rows, progress=progress))
        id_a = np.concatenate([f[0] for f in found]) if found else np.zeros(0, np.int64)
        id_b = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.int64)
        sim = np.concatenate([f[2] for f in found]) if found else np.zeros(0, np.float32)
        edges = pd.DataFrame({
            "id_a": id_a.astype(np.int64),
            "id_b": id_b.astype(np.int64),
            "key_a": keys.reindex(id_a).to_numpy(),
            "key_b": keys.reindex(id_b).to_numpy(),
            "similarity": sim.astype(np.float32),
            "descriptor": self.descriptor,
        })
        write_table(edges, self.run_dir.neighbors_dir(self.descriptor) / f"part_{task_id}.parquet")
        return {"queries": rows.stop - rows.start, "edges": len(edges)}

    def close(self) -> None:
        self._loaded = None


def query_transform_for(descriptor: str):
    """Perceptual vectors are searched with their 8 flips/rotations (a sign/transposition in DCT space)."""
    if descriptor == "perceptual":
        from dedup.descriptors.perceptual import dihedral_variants

        return dihedral_variants
    return None


def find_neighbors(out: str | Path, thresholds: list[str] | None = None, gpu: bool = False,
                   show_progress: bool = True, engine: str = "local", ray_address: str | None = None,
                   ) -> dict[str, StageReport]:
    run = RunDir(out)
    config = cfg.RunConfig.load(run)
    overrides = cfg.parse_assignments(thresholds, "threshold")
    reports = {}
    for name in config.descriptors:
        search_at = min(config.search_thresholds[name], overrides.get(name, np.inf))
        if search_at < config.search_thresholds[name]:
            _clear_stage(run, f"neighbors-{name}", run.neighbors_dir(name))
            config.search_thresholds[name] = search_at
            config.save(run)
        knn_cap = 2048 if gpu else None  # faiss-gpu's k limit; saturated queries are redone exactly
        stage = NeighborsStage(run, name, search_at, knn_cap)
        runner = make_engine(engine, run, show_progress=show_progress, ray_address=ray_address)
        reports[name] = runner.run(stage, unit="queries")
    return reports


def _clear_stage(run: RunDir, stage: str, folder: Path) -> None:
    import shutil

    shutil.rmtree(run.root / "_markers" / stage, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def load_edges(run: RunDir, descriptor: str, threshold: float) -> pd.DataFrame:
    folder = run.neighbors_dir(descriptor)
    parts = sorted(folder.glob("part_*.parquet"))
    if not parts:
        raise StoreError(f"no neighbour edges for {descriptor} in {folder}", hint=f"run 'dedup neighbors {run.root}' first")
    edges = pd.concat([pd.read_parquet(p, columns=["id_a", "id_b", "similarity"]) for p in parts], ignore_index=True)
    edges = edges[edges["similarity"] >= threshold]
    # A pair is found from both ends (and from several parts); keep it once.
    return edges.sort_values("similarity", ascending=False).drop_duplicates(["id_a", "id_b"])


# ---------------------------------------------------------------- cluster


def cluster(out: str | Path, thresholds: list[str] | None = None, guards: list[str] | None = None) -> dict[str, int]:
    from dedup.clustering import cluster_run

    run = RunDir(out)
    config = cfg.RunConfig.load(run)
    cut = {**config.thresholds, **cfg.parse_assignments(thresholds, "threshold")}
    guard = {**config.guards, **cfg.parse_assignments(guards, "guard")}
    for name, value in cut.items():
        if name in config.search_thresholds and value < config.search_thresholds[name] - 1e-9:
            raise DedupError(
                f"threshold {name}={value} is below the {config.search_thresholds[name]} the neighbours were searched at",
                hint=f"run 'dedup neighbors {run.root} --threshold {name}={value}' first",
            )
    clusters, stats = cluster_run(run, config.descriptors, cut, guard)
    write_table(clusters, run.clusters)
    return stats


# ---------------------------------------------------------------- rank / manifests


def rank(out: str | Path) -> pd.DataFrame:
    from dedup.rank import rank_clusters

    run = RunDir(out)
    if not run.clusters.exists():
        raise StoreError(f"{run.root} has no clusters.parquet", hint=f"run 'dedup cluster {run.root}' first")
    ranking = rank_clusters(pd.read_parquet(run.clusters))
    write_table(ranking, run.top_duplicates)
    return ranking


def write_manifests(out: str | Path, keep: str = "first") -> dict[str, int]:
    from dedup.manifests import KeepPolicy
    from dedup.manifests import write_manifests as write

    run = RunDir(out)
    policy = KeepPolicy.parse(keep)
    clusters = pd.read_parquet(run.clusters)
    sizes = load_samples(run, ["sample_id", "width", "height"])
    return write(run, clusters.merge(sizes, on="sample_id", how="left"), policy)


def print_top(ranking: pd.DataFrame, console: Console, top: int = 15) -> None:
    if ranking.empty:
        console.print("no duplicate clusters found")
        return
    table = Table("rank", "copies", "captions", "domains", "shards", "representative key", "caption", title="Most duplicated images")
    for row in ranking.head(top).itertuples():
        caption = (row.representative_caption or "")[:60]
        # Keys and captions are web content: plain Text, never console markup.
        table.add_row(str(row.rank), str(row.copies), str(row.distinct_captions), str(row.url_domains),
                      str(row.shards_spanned), Text(str(row.representative_key)), Text(caption))
    console.print(table)


# ---------------------------------------------------------------- everything


def run_all(shard_specs: list[str], out: str | Path, options: EmbedOptions, thresholds: list[str] | None,
            memory: str, keep: str, with_report: bool, log: Console) -> pd.DataFrame:
    started = time.perf_counter()
    report = embed(shard_specs, out, options, log)
    print_embed_summary(report, log)
    run = RunDir(out)
    gpu = faiss_gpu_available()
    if _index_stale(run):
        for name, spec in build_indexes(out, memory, gpu=gpu).items():
            _clear_stage(run, f"neighbors-{name}", run.neighbors_dir(name))  # edges of the old index
            log.print(f"index {name}: {spec.kind} ({spec.factory}) over {spec.n_vectors:,} vectors")
    find_neighbors(out, thresholds, gpu=gpu, show_progress=options.show_progress,
                   engine=options.engine, ray_address=options.ray_address)
    stats = cluster(out, thresholds)
    log.print(f"clusters: {stats}")
    ranking = rank(out)
    log.print(f"manifests: {write_manifests(out, keep)}")
    if with_report:
        from dedup.report import write_report

        log.print(f"report: {write_report(out)}")
    log.print(f"done in {time.perf_counter() - started:.1f}s")
    return ranking


def faiss_gpu_available() -> bool:
    """faiss-gpu installed and a GPU visible (then `dedup run` indexes and searches on it)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _index_stale(run: RunDir) -> bool:
    """Rebuild indexes when any embedding part is newer than the index files."""
    config = cfg.RunConfig.load(run)
    for name in config.descriptors:
        index_file = run.index_dir / f"{name}.faiss"
        parts = list((run.embedding_dir(name) / "img_emb").glob("*.npy"))
        if not index_file.exists() or any(p.stat().st_mtime > index_file.stat().st_mtime for p in parts):
            return True
    return False
