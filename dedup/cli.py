"""Command line: `dedup demo | run | embed | index | neighbors | cluster | rank | manifests | report | query | eval`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dedup.console import print_embed_summary, print_top
from dedup.errors import DedupError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
out_console = Console()
err_console = Console(stderr=True)

OutArg = Annotated[Path, typer.Argument(help="Run directory written by 'dedup embed' / 'dedup run'.")]
ShardsArg = Annotated[
    list[str],
    typer.Argument(help="Shards: paths, globs, brace patterns (data/{00000..00099}.tar), pipe:/https:// URLs, "
                   "or a data manifest (data_manifests/*.json)."),
]


def _fail(error: DedupError) -> None:
    # soft_wrap: messages stay on one line for grep; escape: paths and keys may hold [brackets].
    err_console.print(f"[bold red]error:[/] {escape(error.message)}", soft_wrap=True)
    if error.hint:
        err_console.print(f"[yellow]hint:[/] {escape(error.hint)}", soft_wrap=True)
    raise typer.Exit(2)


def _guarded(fn):
    """Run a command body; a DedupError becomes a two-line message and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DedupError as error:
            _fail(error)

    return wrapper


def _embed_options(descriptor, model, pretrained, device, batch_size, workers, engine, ray_address):
    from dedup.stages.embed import EmbedOptions

    return EmbedOptions(
        descriptors=descriptor or [],
        clip_model=model,
        clip_pretrained=pretrained,
        device=device,
        batch_size=batch_size,
        workers=workers,
        engine=engine,
        ray_address=ray_address,
    )


DescriptorOpt = Annotated[
    Optional[list[str]],
    typer.Option("--descriptor", "-d", help="perceptual and/or clip (repeat). Default: clip+perceptual on a GPU, perceptual otherwise."),
]
ModelOpt = Annotated[str, typer.Option(help="open_clip model name (or a model-config JSON path).")]
PretrainedOpt = Annotated[str, typer.Option(help="open_clip pretrained tag, or a local checkpoint PATH.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda.")]
BatchOpt = Annotated[int, typer.Option(help="Images per model forward pass.")]
WorkersOpt = Annotated[Optional[int], typer.Option(help="Decode worker processes (0 = decode in this process). Default: one per core, or 0 when CLIP runs on the CPU (the model needs the cores).")]
EngineOpt = Annotated[str, typer.Option(help="local, or ray (pip install 'dedup\\[ray]').")]
RayAddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster address (default: start a local one).")]
ThresholdOpt = Annotated[Optional[list[str]], typer.Option("--threshold", "-t", help="NAME=VALUE similarity cut, e.g. perceptual=0.9.")]
MemoryOpt = Annotated[str, typer.Option("--memory", help="Memory budget for the index, e.g. 8GB.")]
KeepOpt = Annotated[str, typer.Option(help="first | largest | max-copies=N")]


@app.command("descriptors")
def descriptors_command() -> None:
    """List the descriptors dedup can compute."""
    from dedup.descriptors import REGISTRY

    table = Table("name", "kind", "needs weights", "what it is")
    for info in REGISTRY.values():
        table.add_row(info.name, info.kind, "yes" if info.needs_weights else "no", info.summary)
    out_console.print(table)


@app.command("embed")
@_guarded
def embed_command(
    shards: ShardsArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    descriptor: DescriptorOpt = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
) -> None:
    """Read shards and store hashes + descriptors (resumes where it stopped)."""
    from dedup import pipeline

    options = _embed_options(descriptor, model, pretrained, device, batch_size, workers, engine, ray_address)
    report = pipeline.embed(shards, out, options, err_console)
    print_embed_summary(report, err_console)


@app.command("index")
@_guarded
def index_command(out: OutArg, memory: MemoryOpt = "8GB", gpu: Annotated[bool, typer.Option(help="Use faiss-gpu.")] = False) -> None:
    """Build a FAISS index per descriptor (type chosen from size, dim and --memory)."""
    from dedup import pipeline

    for name, spec in pipeline.build_indexes(out, memory, gpu).items():
        err_console.print(f"index {name}: {spec.kind} ({spec.factory}), {spec.n_vectors:,} vectors")


@app.command("neighbors")
@_guarded
def neighbors_command(
    out: OutArg,
    threshold: ThresholdOpt = None,
    gpu: Annotated[bool, typer.Option(help="Search on the GPU (faiss-gpu; counts stay uncapped).")] = False,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
) -> None:
    """All-vs-all range search -> OUT/neighbors/<descriptor>/part_*.parquet."""
    from dedup import pipeline

    pipeline.find_neighbors(out, threshold, gpu, engine=engine, ray_address=ray_address)


@app.command("cluster")
@_guarded
def cluster_command(out: OutArg, threshold: ThresholdOpt = None, guard: Annotated[Optional[list[str]], typer.Option(help="NAME=VALUE chaining guard.")] = None) -> None:
    """Union-find over the edges with a chaining guard -> OUT/clusters.parquet."""
    from dedup import pipeline

    stats = pipeline.cluster(out, threshold, guard)
    err_console.print(stats)


@app.command("rank")
@_guarded
def rank_command(out: OutArg, top: Annotated[int, typer.Option(help="Rows to print.")] = 20) -> None:
    """Rank clusters by copies -> OUT/top_duplicates.parquet."""
    from dedup import pipeline

    print_top(pipeline.rank(out), out_console, top)


@app.command("manifests")
@_guarded
def manifests_command(out: OutArg, keep: KeepOpt = "first") -> None:
    """Write OUT/manifests/{shard}.parquet and OUT/remove_keys.parquet."""
    from dedup.stages.manifests import manifests_stage

    err_console.print(manifests_stage(out, keep))


@app.command("report")
@_guarded
def report_command(out: OutArg, top: Annotated[int, typer.Option(help="Clusters shown.")] = 50) -> None:
    """Write the self-contained HTML report OUT/report/index.html."""
    from dedup.stages.report import write_report

    path = write_report(out, top=top)
    err_console.print(f"report: {path}")


@app.command("run")
@_guarded
def run_command(
    shards: Annotated[Optional[list[str]], typer.Argument(help=ShardsArg.__metadata__[0].help)] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory (required).")] = None,
    embeddings: Annotated[Optional[str], typer.Option(help="Precomputed embeddings folder or fsspec URL (img_emb/ + metadata/, clip-retrieval layout): no images are read.")] = None,
    descriptor: DescriptorOpt = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    threshold: ThresholdOpt = None,
    memory: MemoryOpt = "8GB",
    keep: KeepOpt = "first",
    report: Annotated[bool, typer.Option(help="Write the HTML report.")] = True,
    top: Annotated[int, typer.Option(help="Top clusters printed.")] = 15,
) -> None:
    """Every stage, shards in -> clusters, ranking, manifests, report out. Resumes where it stopped."""
    from dedup import pipeline

    if out is None:
        raise DedupError("no run directory given", hint="pass --out DIR")
    if embeddings is not None:
        if shards:
            raise DedupError("--embeddings runs from precomputed vectors alone", hint="drop the SHARDS arguments")
        from dedup.stages.precomputed import run_from_embeddings

        ranking = run_from_embeddings(embeddings, out, threshold, memory, keep, report, err_console,
                                      engine=engine, ray_address=ray_address)
        print_top(ranking, out_console, top)
        return
    if not shards:
        raise DedupError("no shards given", hint="pass SHARDS, or --embeddings DIR for precomputed vectors")
    options = _embed_options(descriptor, model, pretrained, device, batch_size, workers, engine, ray_address)
    ranking = pipeline.run_all(shards, out, options, threshold, memory, keep, report, err_console)
    print_top(ranking, out_console, top)


@app.command("demo")
@_guarded
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo shards and run go.")] = Path("demo_out"),
    workers: WorkersOpt = None,
    top: Annotated[int, typer.Option(help="Top clusters printed.")] = 10,
) -> None:
    """Build LAION-style demo shards from real photos shipped in the package (offline) and run everything."""
    from dedup import pipeline
    from dedup.synth import build_demo

    shards, truth = build_demo(out / "shards")
    err_console.print(f"demo: {len(shards)} shards, {len(truth)} samples with planted duplicates in {out / 'shards'}")
    options = _embed_options(["perceptual"], "ViT-B-32", "laion2b_s34b_b79k", "auto", 64, workers, "local", None)
    ranking = pipeline.run_all([str(p) for p in shards], out / "run", options, None, "2GB", "first", True, err_console)
    print_top(ranking, out_console, top)
    err_console.print(f"outputs: {out / 'run'}  (report: {out / 'run' / 'report' / 'index.html'})")


@app.command("query")
@_guarded
def query_command(
    out: OutArg,
    image: Annotated[Optional[Path], typer.Option(help="An image file.")] = None,
    images: Annotated[Optional[Path], typer.Option(help="A folder of images.")] = None,
    key: Annotated[Optional[str], typer.Option(help="A sample key of the run.")] = None,
    text: Annotated[Optional[str], typer.Option(help="A text prompt (needs the clip descriptor).")] = None,
    descriptor: Annotated[Optional[str], typer.Option(help="Descriptor to search with (default: the run's first).")] = None,
    limit: Annotated[int, typer.Option(help="Matches listed per query (the count is always exact).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """How many copies of X exist? X is an image file, a folder of images, a sample key or a text prompt."""
    from dedup.stages.query import print_results, query

    results = query(out, image=image, images=images, key=key, text=text, descriptor=descriptor)
    if as_json:
        out_console.print_json(json.dumps([r.to_dict(limit) for r in results]))
    else:
        print_results(results, out_console, limit)


@app.command("eval")
@_guarded
def eval_command(
    out: OutArg,
    truth: Annotated[Path, typer.Option(help="Parquet with key, group_id (and optionally family).")],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Score a run's clusters against labelled ground truth."""
    from dedup.stages.evaluate import evaluate_run, print_metrics

    metrics = evaluate_run(out, truth)
    if as_json:
        out_console.print_json(json.dumps(metrics))
    else:
        print_metrics(metrics, out_console)


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # python -m dedup.cli
    main()
