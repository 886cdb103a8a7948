"""Command line: `dedup demo | run | embed | index | neighbors | cluster | rank | manifests | report | query | eval`."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from dedup.errors import DedupError
from dedup.run import Run
from dedup.settings import DEFAULT_MEMORY, EngineSettings, Settings, parse_assignments

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
    from dedup.console import terminal_safe

    # soft_wrap: messages stay on one line for grep; escape: paths and keys may hold [brackets].
    err_console.print(f"[bold red]error:[/] {escape(terminal_safe(error.message))}", soft_wrap=True)
    if error.hint:
        err_console.print(f"[yellow]hint:[/] {escape(terminal_safe(error.hint))}", soft_wrap=True)
    raise typer.Exit(2)


# Exit status of a run that finished but could not read every shard (see OUT/failed_shards.parquet).
EXIT_FAILED_SHARDS = 3
EXIT_INTERRUPTED = 130


def _retry_command() -> str:
    import shlex

    return shlex.join(["dedup", *sys.argv[1:]])


def _exit_if_shards_failed(out: Path) -> None:
    from dedup.console import print_failed_shards
    from dedup.run import RunDir

    if print_failed_shards(RunDir(out), err_console, _retry_command()):
        raise typer.Exit(EXIT_FAILED_SHARDS)


_locks = contextlib.ExitStack()
_held: set[Path] = set()


def _hold_lock(out: Path) -> None:
    """One writer per run directory: held until the command ends (a second run on OUT stops at once)."""
    from dedup.lock import run_lock

    key = Path(out).resolve()
    if key not in _held and not (Path(out).exists() and not Path(out).is_dir()):
        _locks.enter_context(run_lock(out))
        _held.add(key)


def _release_locks() -> None:
    _locks.close()
    _held.clear()


def _guarded(fn):
    """Run a command body; a DedupError becomes a two-line message and exit code 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DedupError as error:
            _fail(error)
        except KeyboardInterrupt:
            # Finished tasks carry markers and outputs are written atomically: a rerun resumes.
            err_console.print("interrupted; rerun the same command to resume")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        finally:
            _release_locks()

    return wrapper


DescriptorOpt = Annotated[
    list[str] | None,
    typer.Option("--descriptor", "-d", help="perceptual and/or clip (repeat). Default: clip+perceptual on a GPU, perceptual otherwise."),
]
ModelOpt = Annotated[str, typer.Option(help="open_clip model name (or a model-config JSON path).")]
PretrainedOpt = Annotated[str, typer.Option(help="open_clip pretrained tag, or a local checkpoint PATH.")]
DeviceOpt = Annotated[str, typer.Option(help="auto (CUDA when present), cpu, cuda or cuda:N.")]
BatchOpt = Annotated[int, typer.Option(help="Images per model forward pass (>= 1).")]
WorkersOpt = Annotated[int | None, typer.Option(help="Decode worker processes (0 = decode in this process). Default: one per core, or 0 when CLIP runs on the CPU (the model needs the cores).")]
EngineOpt = Annotated[str, typer.Option(help="local, or ray (pip install 'dedup\\[ray]').")]
RayAddressOpt = Annotated[str | None, typer.Option(help="Ray cluster address (default: start a local one).")]
RayActorsOpt = Annotated[int, typer.Option("--ray-actors", help="Ray actors (parallel tasks) per stage.")]
RayCpusOpt = Annotated[float, typer.Option("--ray-cpus-per-actor", help="CPUs reserved by each Ray actor.")]
RayGpusOpt = Annotated[float, typer.Option("--ray-gpus-per-actor", help="GPUs reserved by each Ray actor (CLIP on GPU nodes: 1).")]
ThresholdOpt = Annotated[list[str] | None, typer.Option("--threshold", "-t", help="NAME=VALUE similarity cut, e.g. perceptual=0.9.")]
GuardOpt = Annotated[list[str] | None, typer.Option("--guard", help="NAME=VALUE chaining guard (default: the applied threshold minus the descriptor's offset).")]
MemoryOpt = Annotated[str | None, typer.Option("--memory", help="Memory budget, e.g. 8GB (default: 8GB, or the run's).")]
KeepOpt = Annotated[str | None, typer.Option(help="best (colour, most pixels, least re-encoded) | first | largest | max-copies=N (default: best, or the run's).")]
InputSizeOpt = Annotated[int, typer.Option(help="torchscript: model input side S (images become S x S).")]
MeanOpt = Annotated[str, typer.Option(help="torchscript: per-channel mean, R,G,B in 0..1.")]
StdOpt = Annotated[str, typer.Option(help="torchscript: per-channel std, R,G,B.")]
ResizeOpt = Annotated[str, typer.Option(help="torchscript: square (squash to S x S) or crop (short side S, centre crop).")]
TopOpt = Annotated[int, typer.Option(min=0, help="Top clusters printed.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]
GpuDecodeOpt = Annotated[bool | None, typer.Option("--gpu-decode/--no-gpu-decode", help="clip on CUDA: decode JPEGs on the GPU (nvJPEG) and resize there (default: on with CUDA).")]
LargeCropsOpt = Annotated[bool | None, typer.Option("--large-crops/--no-large-crops", help="Perceptual only: also find large crops (50-75% of a photo) by a two-stage window search. Opt-in: slower, and it can join nested crops of one photo (BENCHMARKS.md, issue 12). Kept by a resumed run unless given.")]
AllowMissingOpt = Annotated[bool, typer.Option("--allow-missing", help="Record local shards absent from a brace range (OUT/missing_shards.parquet) instead of stopping.")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Retries of a failing shard within the run (exponential backoff from 1 s).")]
ConnectTimeoutOpt = Annotated[float, typer.Option("--connect-timeout", help="Seconds to connect to a remote shard.")]
ReadTimeoutOpt = Annotated[float, typer.Option("--read-timeout", help="Seconds to wait for the next bytes of a remote shard.")]
NprobeOpt = Annotated[int | None, typer.Option("--nprobe", help="IVF (cell) index only: cells probed per row, 1..nlist (default: from the threshold, 4 at a search threshold >= 0.93). More finds more pairs, slower. Kept by a resumed run unless given.")]
GpuOpt = Annotated[bool | None, typer.Option("--gpu/--no-gpu", help="Use faiss-gpu (default: when installed and a GPU is visible).")]


def _version(value: bool) -> None:
    if value:
        from dedup import __version__

        out_console.print(f"dedup {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    """Find, rank and remove duplicated images in LAION-style training sets."""


def _engine(engine: str, ray_address: str | None, ray_actors: int, ray_cpus: float, ray_gpus: float,
            progress: bool, retries: int = 2) -> EngineSettings:
    return EngineSettings(name=engine, ray_address=ray_address, ray_actors=ray_actors, ray_cpus_per_actor=ray_cpus,
                          ray_gpus_per_actor=ray_gpus, show_progress=progress, retries=retries).validated()


def _start_run(out: Path, shards: list[str], descriptor, model, pretrained, device, batch_size, workers,
               engine: EngineSettings, threshold=None, guard=None, memory=None, keep=None,
               model_extra: dict | None = None, timeouts: tuple[float, float] = (30.0, 60.0),
               allow_missing: bool = False, large_crops: bool | None = None, nprobe: int | None = None,
               embeddings: str | None = None) -> Run:
    """Parse every option once into Settings, validated before any shard is read; create or resume OUT."""
    thresholds, guards = parse_assignments(threshold, "threshold"), parse_assignments(guard, "guard")
    requested = Settings.build(
        shard_specs=shards, descriptors=descriptor or [], keep=keep or "best", memory=memory or DEFAULT_MEMORY,
        batch_size=batch_size, workers=workers, device=device, engine=engine, thresholds=thresholds, guards=guards,
        model_options={"model": model, "pretrained": pretrained, **(model_extra or {})},
        connect_timeout_s=timeouts[0], read_timeout_s=timeouts[1], allow_missing=allow_missing,
        large_crops=bool(large_crops), nprobe=nprobe, embeddings=embeddings,
    )
    given = {name for name, value in (("descriptors", descriptor), ("keep", keep), ("memory_budget_bytes", memory),
                                      ("large_crops", large_crops is not None), ("nprobe", nprobe is not None)) if value}
    _hold_lock(out)
    run = Run.start(out, requested, err_console, given=frozenset(given))
    if thresholds or guards:  # a resumed run keeps its cuts unless new ones are given
        run.settings = run.settings.with_cuts(thresholds, guards).validated()
        run.save()
    from dedup.descriptors import default_reason

    how = "chosen with --descriptor" if descriptor else default_reason()
    run.log(f"descriptors: {', '.join(run.settings.descriptors)} ({how})")
    return run


def _refuse_precomputed(descriptor: list[str] | None) -> None:
    """`precomputed` is not computed from images: its vectors come from a folder."""
    if descriptor and "precomputed" in descriptor:
        raise DedupError("the precomputed descriptor's vectors come from --embeddings DIR",
                         hint="run 'dedup run SHARDS --embeddings DIR --out OUT', or choose another --descriptor")


def _open_run(out: Path, threshold=None, guard=None, search: bool = True, **changes) -> Run:
    """An existing run; options given here update its run.json before the stage runs."""
    _hold_lock(out)
    return Run.open(out, err_console, thresholds=parse_assignments(threshold, "threshold"),
                    guards=parse_assignments(guard, "guard"), search=search, **changes)


def _with_engine(run: Run, engine: EngineSettings) -> Run:
    from dataclasses import replace

    run.settings = replace(run.settings, engine=engine)
    return run


@app.command("descriptors")
def descriptors_command() -> None:
    """List the descriptors dedup can compute."""
    from dedup.descriptors import REGISTRY

    table = Table("name", "kind", "needs weights", "default threshold", "what it is")
    for info in REGISTRY.values():
        threshold = "exact" if info.kind == "exact" else f"{info.threshold():.2f}"
        table.add_row(info.name, info.kind, "yes" if info.needs_weights else "no", threshold, info.summary)
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
    ray_actors: RayActorsOpt = 2,
    ray_cpus_per_actor: RayCpusOpt = 1.0,
    ray_gpus_per_actor: RayGpusOpt = 0.0,
    progress: ProgressOpt = True,
    input_size: InputSizeOpt = 320,
    mean: MeanOpt = "0.485,0.456,0.406",
    std: StdOpt = "0.229,0.224,0.225",
    resize: ResizeOpt = "square",
    retries: RetriesOpt = 2,
    connect_timeout: ConnectTimeoutOpt = 30.0,
    read_timeout: ReadTimeoutOpt = 60.0,
    allow_missing: AllowMissingOpt = False,
    gpu_decode: GpuDecodeOpt = None,
) -> None:
    """Read shards and store hashes + descriptors (resumes where it stopped)."""
    from dedup.console import print_embed_summary
    from dedup.stages.embed import embed

    _refuse_precomputed(descriptor)
    engine_settings = _engine(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, progress, retries)
    run = _start_run(out, shards, descriptor, model, pretrained, device, batch_size, workers, engine_settings,
                     model_extra={"image_size": input_size, "mean": mean, "std": std, "resize": resize,
                                  "gpu_decode": gpu_decode},
                     timeouts=(connect_timeout, read_timeout), allow_missing=allow_missing)
    print_embed_summary(embed(run), err_console)
    _exit_if_shards_failed(out)


@app.command("index")
@_guarded
def index_command(out: OutArg, memory: MemoryOpt = None, gpu: GpuOpt = None, nprobe: NprobeOpt = None) -> None:
    """Build a FAISS index per descriptor (type chosen from size, dim and --memory)."""
    from dedup.settings import parse_size
    from dedup.stages.increment import build_indexes

    run = _open_run(out, memory_budget_bytes=parse_size(memory) if memory else None, nprobe=nprobe)
    for name, spec in build_indexes(run, gpu=gpu).items():
        err_console.print(f"index {name}: {spec.kind} ({spec.factory}), {spec.n_vectors:,} vectors", markup=False)


@app.command("neighbors")
@_guarded
def neighbors_command(
    out: OutArg,
    threshold: ThresholdOpt = None,
    gpu: GpuOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 2,
    ray_cpus_per_actor: RayCpusOpt = 1.0,
    progress: ProgressOpt = True,
) -> None:
    """All-vs-all range search -> OUT/neighbors/<descriptor>/part_*.parquet (and the crop search of --large-crops runs)."""
    from dedup.stages.crops import find_crops
    from dedup.stages.neighbors import find_neighbors

    run = _with_engine(_open_run(out, threshold),
                       _engine(engine, ray_address, ray_actors, ray_cpus_per_actor, 0.0, progress))
    find_neighbors(run, gpu=gpu)
    find_crops(run)  # its edges are neighbour edges too: `dedup cluster` after this must see the run's own


@app.command("cluster")
@_guarded
def cluster_command(out: OutArg, threshold: ThresholdOpt = None, guard: GuardOpt = None) -> None:
    """Union-find over the edges with a chaining guard -> OUT/clusters.parquet."""
    from dedup.stages.cluster import cluster

    err_console.print(cluster(_open_run(out, threshold, guard, search=False)))


@app.command("rank")
@_guarded
def rank_command(out: OutArg, top: TopOpt = 20, by: Annotated[str | None, typer.Option(
        help="copies, or risk (memorisation risk: copies, caption sameness, domains). Default: the run's (copies).")] = None) -> None:
    """Rank clusters by copies or memorisation risk -> OUT/top_duplicates.parquet."""
    from dedup.console import print_top
    from dedup.stages.rank import rank

    print_top(rank(_open_run(out, optional=True, rank_by=by)), out_console, top)


@app.command("manifests")
@_guarded
def manifests_command(out: OutArg, keep: KeepOpt = None) -> None:
    """Write OUT/manifests/<stem>-<hash>.parquet (index: OUT/manifests/_index.parquet) and OUT/remove_keys.parquet."""
    from dedup.stages.manifests import manifests_stage

    err_console.print(manifests_stage(_open_run(out, keep=keep)))


@app.command("report")
@_guarded
def report_command(out: OutArg, top: Annotated[int, typer.Option(min=1, help="Clusters shown.")] = 50,
                   by: Annotated[str, typer.Option(help="Gallery order: copies, or risk (memorisation risk).")] = "copies") -> None:
    """Write the self-contained HTML report OUT/report/index.html."""
    from dedup.stages.report import report_stage

    err_console.print(f"report: {report_stage(_open_run(out), top=top, order=by)}", markup=False)


@app.command("run")
@_guarded
def run_command(
    shards: Annotated[list[str] | None, typer.Argument(help=ShardsArg.__metadata__[0].help)] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Run directory (required).")] = None,
    embeddings: Annotated[str | None, typer.Option(help="Precomputed embeddings folder or fsspec URL (img_emb/ + metadata/, clip-retrieval layout). Alone: no images are read. Beside SHARDS: its vectors serve the samples its metadata names by shard and key, or url (never key alone).")] = None,
    descriptor: DescriptorOpt = None,
    model: ModelOpt = "ViT-B-32",
    pretrained: PretrainedOpt = "laion2b_s34b_b79k",
    device: DeviceOpt = "auto",
    batch_size: BatchOpt = 64,
    workers: WorkersOpt = None,
    engine: EngineOpt = "local",
    ray_address: RayAddressOpt = None,
    ray_actors: RayActorsOpt = 2,
    ray_cpus_per_actor: RayCpusOpt = 1.0,
    ray_gpus_per_actor: RayGpusOpt = 0.0,
    threshold: ThresholdOpt = None,
    guard: GuardOpt = None,
    memory: MemoryOpt = None,
    keep: KeepOpt = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report.")] = True,
    top: TopOpt = 15,
    progress: ProgressOpt = True,
    input_size: InputSizeOpt = 320,
    mean: MeanOpt = "0.485,0.456,0.406",
    std: StdOpt = "0.229,0.224,0.225",
    resize: ResizeOpt = "square",
    retries: RetriesOpt = 2,
    connect_timeout: ConnectTimeoutOpt = 30.0,
    read_timeout: ReadTimeoutOpt = 60.0,
    allow_missing: AllowMissingOpt = False,
    gpu_decode: GpuDecodeOpt = None,
    large_crops: LargeCropsOpt = None,
    nprobe: NprobeOpt = None,
) -> None:
    """Every stage, shards in -> clusters, ranking, manifests, report out. Resumes where it stopped."""
    from dedup.console import print_top
    from dedup.pipeline import run_all

    if out is None:
        raise DedupError("no run directory given", hint="pass --out DIR")
    if embeddings is not None and not shards:
        from dedup.pipeline import run_from_embeddings
        from dedup.stages.precomputed import PRECOMPUTED

        engine_settings = _engine(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, progress, retries)
        run = _start_run(out, [embeddings], [PRECOMPUTED], model, pretrained, device, batch_size, workers,
                         engine_settings, threshold, guard, memory, keep, nprobe=nprobe)
        print_top(run_from_embeddings(run, with_report=report), out_console, top)
        return
    if not shards:
        raise DedupError("no shards given", hint="pass SHARDS, or --embeddings DIR for precomputed vectors")
    if embeddings is not None:  # beside shards: fail on a folder that cannot name samples before any shard is read
        from dedup.stages.precomputed_join import check_embeddings_beside_shards, embeddings_location

        embeddings = embeddings_location(embeddings)  # run.json names it wherever a later command runs
        check_embeddings_beside_shards(embeddings)
    else:
        _refuse_precomputed(descriptor)
    engine_settings = _engine(engine, ray_address, ray_actors, ray_cpus_per_actor, ray_gpus_per_actor, progress, retries)
    run = _start_run(out, shards, descriptor, model, pretrained, device, batch_size, workers, engine_settings,
                     threshold, guard, memory, keep,
                     model_extra={"image_size": input_size, "mean": mean, "std": std, "resize": resize,
                                  "gpu_decode": gpu_decode},
                     timeouts=(connect_timeout, read_timeout), allow_missing=allow_missing, large_crops=large_crops,
                     nprobe=nprobe, embeddings=embeddings)
    print_top(run_all(run, with_report=report), out_console, top)
    _exit_if_shards_failed(out)


@app.command("demo")
@_guarded
def demo_command(
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the demo shards and run go.")] = Path("demo_out"),
    workers: WorkersOpt = None,
    top: TopOpt = 10,
) -> None:
    """Build LAION-style demo shards from real photos shipped in the package (offline) and run everything."""
    from dedup.console import print_top
    from dedup.pipeline import run_all
    from dedup.synth import build_demo

    shards, truth = build_demo(out / "shards")
    err_console.print(f"demo: {len(shards)} shards, {len(truth)} samples with planted duplicates in {out / 'shards'}",
                      markup=False)
    run = _start_run(out / "run", [str(p) for p in shards], ["perceptual"], "ViT-B-32", "laion2b_s34b_b79k", "auto",
                     64, workers, EngineSettings(), memory="2GB")
    print_top(run_all(run), out_console, top)
    err_console.print(f"outputs: {out / 'run'}  (report: {out / 'run' / 'report' / 'index.html'})", markup=False)


@app.command("query")
@_guarded
def query_command(
    out: OutArg,
    image: Annotated[Path | None, typer.Option(help="An image file.")] = None,
    images: Annotated[Path | None, typer.Option(help="A folder of images.")] = None,
    key: Annotated[str | None, typer.Option(help="A sample key of the run.")] = None,
    shard: Annotated[str | None, typer.Option(help="With --key: the shard of the sample, as given to the run (keys repeat across outputs).")] = None,
    occurrence: Annotated[int | None, typer.Option(min=0, help="With --key: which of the shard's samples with that key (0: the first in tar order; keys can repeat inside a shard).")] = None,
    text: Annotated[str | None, typer.Option(help="A text prompt (needs the clip descriptor).")] = None,
    descriptor: Annotated[str | None, typer.Option(help="Descriptor to search with (default: the run's first).")] = None,
    limit: Annotated[int, typer.Option(min=0, help="Matches listed per query (the count is always exact).")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
    min_similarity: Annotated[float | None, typer.Option(help="--text: count images at or above this image-text cosine (default: LAION's caption cut for the model, 0.28 for ViT-B-32).")] = None,
    model: Annotated[str | None, typer.Option(help="Runs from precomputed embeddings: the open_clip model that made them (e.g. ViT-L-14), for --image/--images/--text.")] = None,
    pretrained: Annotated[str | None, typer.Option(help="With --model: its pretrained tag (e.g. openai) or a local checkpoint PATH.")] = None,
    device: Annotated[str | None, typer.Option(help="With --model: auto (CUDA when present), cpu, cuda or cuda:N.")] = None,
) -> None:
    """How many copies of X exist? X is an image file, a folder of images, a sample key or a text prompt."""
    from dedup.console import print_results
    from dedup.stages.query import query

    given = {"model": model, "pretrained": pretrained, "device": device}
    model_options = {name: value for name, value in given.items() if value is not None}
    if model_options and "model" not in model_options:
        raise DedupError("--pretrained and --device go with --model", hint="pass --model NAME as well (the model that made the embeddings)")
    results = query(out, image=image, images=images, key=key, text=text, descriptor=descriptor,
                    min_similarity=min_similarity, shard=shard, model_options=model_options, occurrence=occurrence)
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
    from dedup.console import print_metrics
    from dedup.stages.evaluate import evaluate_run

    metrics = evaluate_run(out, truth)
    if as_json:
        out_console.print_json(json.dumps(metrics))
    else:
        print_metrics(metrics, out_console)


@app.command("compare")
@_guarded
def compare_command(
    train_out: Annotated[Path, typer.Argument(help="Finished training run (dedup run ... --out TRAIN_OUT).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Where contamination.parquet and the report go.")],
    eval_shards: Annotated[list[str] | None, typer.Argument(help="Evaluation shards (embedded into OUT/eval_run with the training run's settings).")] = None,
    eval_run: Annotated[Path | None, typer.Option(help="A finished evaluation run instead of shards.")] = None,
    remove_from: Annotated[str | None, typer.Option(help="train: write remove_from_train.parquet; eval: remove_from_eval.parquet.")] = None,
    workers: WorkersOpt = None,
    report: Annotated[bool, typer.Option(help="Write OUT/report/index.html.")] = True,
) -> None:
    """Which evaluation samples have copies in the training run (its descriptors and thresholds)?"""
    from dedup.stages.compare import compare, summary_line

    summary = compare(train_out, out, eval_shards=eval_shards or None, eval_out=eval_run, remove_from=remove_from,
                      workers=workers, with_report=report, log=err_console)
    out_console.print(summary_line(summary), soft_wrap=True)


@app.command("export")
@_guarded
def export_command(
    out: OutArg,
    dest: Annotated[Path, typer.Option("--out", "-o", help="Folder for urls.parquet (and shards/).")],
    shards: Annotated[bool, typer.Option("--shards", help="Also write deduplicated webdataset shards (kept samples, members unchanged).")] = False,
    remove: Annotated[list[Path] | None, typer.Option(help="Extra remove list(s) with shard and key columns, e.g. remove_from_train.parquet.")] = None,
) -> None:
    """Kept samples only: a url+caption parquet img2dataset downloads again, and optionally rewritten shards."""
    from dedup.stages.export import export

    err_console.print(export(out, dest, shards=shards, remove_lists=remove or []))


@app.command("review")
@_guarded
def review_command(
    out: OutArg,
    decision: Annotated[str, typer.Argument(help="not-duplicate-cluster CLUSTER_ID | not-duplicate-pair KEY_A KEY_B | keep KEY | list")],
    refs: Annotated[list[str] | None, typer.Argument(help="Cluster id, or sample keys (id:SAMPLE_ID for a sample id).")] = None,
    note: Annotated[str | None, typer.Option(help="Why (kept in overrides.parquet and shown in the report).")] = None,
) -> None:
    """Record a reviewer's decision in OUT/overrides.parquet; cluster and manifests apply it on every rerun."""
    import pandas as pd
    from rich.text import Text

    from dedup.records import RunDir
    from dedup.stages.overrides import add_override, load_overrides, review_row

    run = RunDir(out)
    if decision == "list":
        table = load_overrides(run)
    else:
        table = add_override(run, review_row(run, decision.replace("-", "_"), refs or [], note))
        err_console.print(f"recorded; apply it with: dedup cluster {escape(str(out))} && dedup rank {escape(str(out))} "
                          f"&& dedup manifests {escape(str(out))}", soft_wrap=True)
    shown = Table("kind", "cluster", "a", "b", "keep", "note")
    for row in table.itertuples():
        shown.add_row(*(Text("" if pd.isna(v) else str(v)) for v in (row.kind, row.cluster_id, row.sample_id_a, row.sample_id_b, row.keep_sample_id, row.note)))
    out_console.print(shown)


def main() -> None:  # pragma: no cover - console entry point
    app(sys.argv[1:])


if __name__ == "__main__":  # python -m dedup.cli
    main()
