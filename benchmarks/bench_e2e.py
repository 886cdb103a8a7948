"""End-to-end speed of `dedup run` beside the peer tools, on the same images, in one run.

    python benchmarks/bench_e2e.py --n 5000 --tools imagededup_phash --rounds 3 --workers 2
    python benchmarks/bench_e2e.py --n 20000 --tools imagededup_phash,fastdup --no-report

Rounds are interleaved (dedup, then each peer, then dedup again...), because the
machine may be shared and its load changes from minute to minute; each tool's
best round (shortest wall time) is compared, and every round's load average is
kept in the results. Both dedup and imagededup get `--workers` processes.

1. Builds LAION-like shards with `make_benchmark.py` (cached under
   `benchmarks/_data/speed_n{N}_seed{S}/`, git-ignored).
2. Times `dedup run SHARDS --out DIR --descriptor perceptual --workers W` as a
   subprocess: shards in, clusters + manifests + HTML report out (`--no-report`
   leaves the report out). Its stage times are read
   back from the run directory (embed / neighbour markers and the mtimes of
   each stage's output file), so the measured run is not instrumented.
3. Extracts the same images from the tars into one folder, once and untimed
   (peers read image files; dedup reads the tars itself, which is in its time),
   and times `benchmarks/peers/run_peer.py` for each peer tool.

Memory is measured the same way for every command: the peak of the summed RSS of
the process and all its descendants, sampled every 0.1 s with psutil (shared
pages of forked workers count once per process), plus the largest single
process's peak from `/usr/bin/time -v`.

Results go to `benchmarks/results/speed_e2e_{N}.json`; a markdown table is
printed. Targets (issue "Speed and scale"): dedup >= 3x imagededup PHash and
>= fastdup, in images/s.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEDUP_BIN = REPO_ROOT / ".venv" / "bin" / "dedup"
PEERS_PYTHON = REPO_ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"
RUN_PEER = REPO_ROOT / "benchmarks" / "peers" / "run_peer.py"
MAKE_BENCHMARK = REPO_ROOT / "benchmarks" / "make_benchmark.py"
DATA_DIR = REPO_ROOT / "benchmarks" / "_data"
WORK_DIR = REPO_ROOT / "benchmarks" / "_work"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
GNU_TIME = Path("/usr/bin/time")

PEER_TOOLS = ("imagededup_phash", "pdq", "fastdup", "cleanvision")
PEER_LABELS = {"imagededup_phash": "imagededup PHash", "pdq": "PDQ (pdqhash)", "fastdup": "fastdup",
               "cleanvision": "cleanvision"}
# Issue "Speed and scale": dedup images/s must be at least this multiple of the peer's.
TARGET_RATIOS = {"imagededup_phash": 3.0, "fastdup": 1.0}
RSS_SAMPLE_SECONDS = 0.1
# Seed 1 and 2 are make_benchmark's tuning / held-out sets; speed gets its own.
DEFAULT_SEED = 3


class BenchmarkError(RuntimeError):
    """A benchmark step failed; the message says which command and why."""


# ---------------------------------------------------------------- measuring a command


@dataclass
class Measurement:
    command: list[str]
    wall_seconds: float
    peak_tree_rss_mb: float  # summed RSS of the process tree, sampled
    peak_process_rss_mb: float | None  # largest single process (GNU time), None without /usr/bin/time
    cpu_seconds: float | None  # user + system CPU of the process and its children (GNU time)
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float]
    started_at: float  # time.time() just before the process started
    returncode: int
    stdout: str = field(repr=False, default="")
    stderr_tail: str = field(repr=False, default="")


class _TreeRssSampler:
    """Polls the summed RSS of a process and its descendants on a background thread."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_bytes = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> _TreeRssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, _tree_rss_bytes(self.pid))
            self._stop.wait(RSS_SAMPLE_SECONDS)


def _tree_rss_bytes(pid: int) -> int:
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that exited between listing and reading
            continue
    return total


def measure(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> Measurement:
    """Run `command`, returning wall time, peak memory and output; never raises on a non-zero exit."""
    time_file = WORK_DIR / f".gnu_time_{os.getpid()}.txt"
    wrapped = [str(GNU_TIME), "-v", "-o", str(time_file), *command] if GNU_TIME.exists() else command
    load = os.getloadavg()
    started_at = time.time()
    started = time.perf_counter()
    process = subprocess.Popen(wrapped, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    with _TreeRssSampler(process.pid) as sampler:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
            stderr += f"\n[bench_e2e] killed after the {timeout:.0f} s timeout"
    wall = time.perf_counter() - started
    peak_process_mb, cpu_seconds = _gnu_time(time_file)
    return Measurement(
        command=command, wall_seconds=wall, peak_tree_rss_mb=sampler.peak_bytes / 2**20,
        peak_process_rss_mb=peak_process_mb, cpu_seconds=cpu_seconds, load_average_before=load,
        load_average_after=os.getloadavg(),
        started_at=started_at, returncode=process.returncode, stdout=stdout, stderr_tail=stderr[-3000:],
    )


def _gnu_time(time_file: Path) -> tuple[float | None, float | None]:
    """(largest single process's peak RSS in MB, CPU seconds of the process and its waited-for children)."""
    if not time_file.exists():
        return None, None
    text = time_file.read_text()
    time_file.unlink()
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return (int(found.group(1)) / 1024 if found else None), (sum(cpu) if len(cpu) == 2 else None)


# ---------------------------------------------------------------- inputs


def ensure_shards(n: int, seed: int) -> tuple[Path, list[Path]]:
    """The cached benchmark set for (n, seed), built by make_benchmark.py when missing."""
    folder = DATA_DIR / f"speed_n{n}_seed{seed}"
    if not (folder / "benchmark.json").exists():
        print(f"building {n} samples into {folder} (once; cached)", flush=True)
        command = [sys.executable, str(MAKE_BENCHMARK), "--out", str(folder), "--n", str(n), "--seed", str(seed)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchmarkError(f"make_benchmark failed: {done.stderr[-2000:]}")
    shards = sorted(folder.glob("*.tar"))
    if not shards:
        raise BenchmarkError(f"{folder} holds no .tar shards; delete it and rerun to rebuild")
    return folder, shards


def extract_images(shards: list[Path], folder: Path) -> dict[str, Any]:
    """Write every image that PIL can decode to `folder` as `{key}{ext}` (untimed, done once).

    Peers read files; samples PIL cannot open (the benchmark's planted bad
    samples) are left out, because some peers stop on the first unreadable file.
    """
    summary_file = folder / "_extracted.json"
    if summary_file.exists():
        return json.loads(summary_file.read_text())
    from dedup.stages.read import read_shard

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    written, skipped = 0, {}
    for shard_index, shard in enumerate(shards):
        for sample in read_shard(str(shard), shard_index):
            reason = _unreadable_reason(sample.image_bytes) if sample.failure is None else sample.failure[0]
            if reason:
                skipped[reason] = skipped.get(reason, 0) + 1
                continue
            suffix = Path(sample.image_member or ".jpg").suffix
            target = folder / f"{sample.key}{suffix}"
            if target.exists():
                raise BenchmarkError(f"two samples share the key {sample.key!r}; peers need unique file stems")
            target.write_bytes(sample.image_bytes or b"")
            written += 1
    summary = {"images": written, "skipped": skipped}
    summary_file.write_text(json.dumps(summary))
    return summary


def _unreadable_reason(image_bytes: bytes | None) -> str | None:
    if not image_bytes:
        return "empty"
    try:
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - any PIL failure means a peer would fail on it too
        return f"pil:{type(exc).__name__}"
    return None


# ---------------------------------------------------------------- dedup


def dedup_command() -> tuple[list[str], dict[str, str]]:
    """The installed `dedup` script, or this checkout's CLI module where dedup is not installed in a venv here."""
    if DEDUP_BIN.exists():
        return [str(DEDUP_BIN)], {}
    return [sys.executable, "-m", "dedup.cli"], {"PYTHONPATH": str(REPO_ROOT)}


def run_dedup(shards: list[Path], out: Path, n_samples: int, workers: int, report: bool) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    program, env = dedup_command()
    command = [*program, "run", *map(str, shards), "--out", str(out), "--descriptor", "perceptual",
               "--workers", str(workers), "--no-progress", *([] if report else ["--no-report"])]
    measured = measure(command, env=env)
    if measured.returncode != 0:
        raise BenchmarkError(f"dedup run failed (exit {measured.returncode}): {measured.stderr_tail}")
    return {
        "tool": "dedup",
        "n_images": n_samples,
        "input": "webdataset tars (read, decoded and hashed by dedup)",
        **_timing_fields(measured, n_samples),
        "stages_seconds": stage_seconds(out, measured.started_at, measured.wall_seconds),
        **_cluster_counts(out),
    }


def _timing_fields(measured: Measurement, n_images: int) -> dict[str, Any]:
    return {
        "wall_seconds": round(measured.wall_seconds, 2),
        "wall_images_per_s": round(n_images / measured.wall_seconds, 1),
        "peak_tree_rss_mb": round(measured.peak_tree_rss_mb, 1),
        "peak_process_rss_mb": None if measured.peak_process_rss_mb is None else round(measured.peak_process_rss_mb, 1),
        "cpu_seconds": None if measured.cpu_seconds is None else round(measured.cpu_seconds, 2),
        "cpu_ms_per_image": None if measured.cpu_seconds is None else round(1000 * measured.cpu_seconds / n_images, 2),
        "load_average_before": [round(x, 2) for x in measured.load_average_before],
        "load_average_after": [round(x, 2) for x in measured.load_average_after],
        "command": " ".join(measured.command),
    }


def stage_seconds(out: Path, started_at: float, wall: float) -> dict[str, float]:
    """Where dedup's wall time went, from its markers and each stage's output file mtime.

    embed tasks start at (marker mtime - marker seconds); every later stage ends
    when its output file is published (atomic rename), so the gap between two
    consecutive outputs is the later stage's time.
    """
    embed_markers = [json.loads(p.read_text()) | {"mtime": p.stat().st_mtime}
                     for p in (out / "_markers" / "embed").glob("*.done")]
    neighbor_markers = list((out / "_markers").glob("neighbors-*/*.done"))
    first_task_start = min(m["mtime"] - m["seconds"] for m in embed_markers)
    ends = {
        "embed": max(m["mtime"] for m in embed_markers),
        "index": max(p.stat().st_mtime for p in (out / "index").glob("*.faiss")),
        "neighbors": max(p.stat().st_mtime for p in neighbor_markers),
        "cluster": (out / "clusters.parquet").stat().st_mtime,
        "rank": (out / "top_duplicates.parquet").stat().st_mtime,
        "manifests": (out / "remove_keys.parquet").stat().st_mtime,
    }
    if (out / "report" / "index.html").exists():
        ends["report"] = (out / "report" / "index.html").stat().st_mtime
    seconds = {"startup (imports, config, descriptor check)": first_task_start - started_at}
    previous = first_task_start
    for stage, end in ends.items():
        seconds[stage] = end - previous
        previous = end
    seconds["exit"] = started_at + wall - previous
    seconds["embed: sum of shard tasks"] = sum(m["seconds"] for m in embed_markers)
    return {name: round(value, 2) for name, value in seconds.items()}


def _cluster_counts(out: Path) -> dict[str, int]:
    import pandas as pd

    clusters = pd.read_parquet(out / "clusters.parquet", columns=["cluster_id", "cluster_size"])
    copies = clusters[clusters["cluster_size"] > 1]
    return {"clusters_with_copies": int(copies["cluster_id"].nunique()), "samples_in_clusters": len(copies)}


# ---------------------------------------------------------------- peers


def run_peer(tool: str, images: Path, work: Path, timeout: float, workers: int) -> dict[str, Any]:
    command = [str(PEERS_PYTHON), str(RUN_PEER), "--tool", tool, "--images", str(images),
               "--out", str(work / f"pairs_{tool}.parquet"), "--workers", str(workers)]
    measured = measure(command, env={"SENTRY_OPT_OUT": "1", "FASTDUP_PRODUCTION": "1"}, timeout=timeout)
    if measured.returncode != 0:
        return {"tool": tool, "failed": True, "returncode": measured.returncode,
                "error_tail": measured.stderr_tail[-1500:], **_timing_fields(measured, 1)}
    own = json.loads(measured.stdout.strip().splitlines()[-1])
    return {
        **own,
        "input": "image files extracted from the same tars",
        **_timing_fields(measured, own["n_images"]),
    }


# ---------------------------------------------------------------- report


def compare(dedup: dict[str, Any], peers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratio of dedup's end-to-end images/s to each peer's, against the peer's work-only and wall rates."""
    rows = []
    for peer in peers:
        if peer.get("failed"):
            continue
        vs_work = dedup["wall_images_per_s"] / peer["images_per_s"]
        vs_wall = dedup["wall_images_per_s"] / peer["wall_images_per_s"]
        target = TARGET_RATIOS.get(peer["tool"])
        cpu = (None if not (peer.get("cpu_ms_per_image") and dedup.get("cpu_ms_per_image"))
               else round(peer["cpu_ms_per_image"] / dedup["cpu_ms_per_image"], 2))
        rows.append({
            "peer": peer["tool"], "ratio_vs_peer_work": round(vs_work, 2), "ratio_vs_peer_wall": round(vs_wall, 2),
            "ratio_cpu_per_image": cpu,  # peer CPU ms per image / dedup's: what the load of other jobs changes least
            "target": target, "target_met": None if target is None else vs_work >= target,
        })
    return rows


def _best(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The round with the shortest wall time (least disturbed by other jobs); a failed round only if all failed."""
    finished = [r for r in rounds if not r.get("failed")] or rounds
    return min(finished, key=lambda r: r["wall_seconds"])


def markdown_table(dedup: dict[str, Any], peers: list[dict[str, Any]], ratios: list[dict[str, Any]]) -> str:
    by_peer = {r["peer"]: r for r in ratios}
    lines = [
        "| tool | images | images/s (work) | wall s (incl. start-up) | images/s (wall) | peak RSS tree MB "
        "| peak RSS 1 process MB | dedup / tool (work, wall) |",
        "|---|---|---|---|---|---|---|---|",
        f"| dedup (perceptual, tars in, manifests out) | {dedup['n_images']:,} | - | {dedup['wall_seconds']:.1f} "
        f"| {dedup['wall_images_per_s']:.1f} | {dedup['peak_tree_rss_mb']:,.0f} "
        f"| {_mb(dedup['peak_process_rss_mb'])} | - |",
    ]
    for peer in peers:
        label = PEER_LABELS[peer["tool"]]
        if peer.get("failed"):
            lines.append(f"| {label} | failed (exit {peer['returncode']}) | | {peer['wall_seconds']:.1f} | | | | |")
            continue
        ratio = by_peer[peer["tool"]]
        target = f" (target >= {ratio['target']:g}x)" if ratio["target"] else ""
        lines.append(
            f"| {label} | {peer['n_images']:,} | {peer['images_per_s']:.1f} | {peer['wall_seconds']:.1f} "
            f"| {peer['wall_images_per_s']:.1f} | {peer['peak_tree_rss_mb']:,.0f} | {_mb(peer['peak_process_rss_mb'])} "
            f"| {ratio['ratio_vs_peer_work']:.2f}x, {ratio['ratio_vs_peer_wall']:.2f}x{target} |"
        )
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}"


def stage_table(stages: dict[str, float]) -> str:
    lines = ["| dedup stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {seconds:.2f} |" for name, seconds in stages.items()]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform()}


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5000, help="samples in the benchmark set (default 5000)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"make_benchmark seed (default {DEFAULT_SEED})")
    parser.add_argument("--tools", default=",".join(PEER_TOOLS),
                        help=f"comma-separated peer tools, or 'none' (default: {','.join(PEER_TOOLS)})")
    parser.add_argument("--peer-timeout", type=float, default=1800, help="seconds before a peer run is killed")
    parser.add_argument("--out", type=Path, help="results JSON (default benchmarks/results/speed_e2e_{n}.json)")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each tool's best round counts")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="processes for dedup (--workers) and imagededup (num_enc/dist_workers); default: cores")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="dedup writes its HTML report too (default; --no-report leaves it out)")
    return parser.parse_args(argv)


def _tools(spec: str) -> list[str]:
    tools = [] if spec == "none" else [t.strip() for t in spec.split(",") if t.strip()]
    unknown = sorted(set(tools) - set(PEER_TOOLS))
    if unknown:
        raise BenchmarkError(f"unknown --tools {unknown}; choose from {', '.join(PEER_TOOLS)} or 'none'")
    return tools


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = _tools(args.tools)
    if tools and not PEERS_PYTHON.exists():
        raise BenchmarkError(f"{PEERS_PYTHON} is missing: run 'bash benchmarks/peers/setup.sh', or pass --tools none")
    folder, shards = ensure_shards(args.n, args.seed)
    work = WORK_DIR / f"speed_e2e_n{args.n}_seed{args.seed}"
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    extracted = extract_images(shards, images) if tools else None

    dedup_rounds: list[dict[str, Any]] = []
    peer_rounds: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}: dedup run on {len(shards)} shards of {folder} ...", flush=True)
        dedup_rounds.append(run_dedup(shards, work / "dedup_run", args.n, args.workers, args.report))
        print(f"  {dedup_rounds[-1]['wall_seconds']} s, {dedup_rounds[-1]['wall_images_per_s']} images/s, "
              f"load {dedup_rounds[-1]['load_average_before'][0]}", flush=True)
        for tool in tools:
            print(f"  {tool} on {extracted['images']:,} files ...", flush=True)
            peer_rounds[tool].append(run_peer(tool, images, work, args.peer_timeout, args.workers))
            shown = {k: peer_rounds[tool][-1].get(k) for k in ("seconds", "images_per_s", "wall_seconds", "failed")}
            print(f"  {json.dumps(shown)}, load {peer_rounds[tool][-1]['load_average_before'][0]}", flush=True)
    dedup = _best(dedup_rounds)
    peers = [_best(rounds) for rounds in peer_rounds.values()]
    ratios = compare(dedup, peers)

    result = {"n": args.n, "seed": args.seed, "shards": [str(s.relative_to(REPO_ROOT)) for s in shards],
              "extracted_images": extracted, "machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "rounds": args.rounds, "workers": args.workers, "report": args.report,
              "dedup": dedup, "peers": peers, "ratios": ratios,
              "all_rounds": {"dedup": dedup_rounds, **peer_rounds},
              "skipped_tools": [t for t in PEER_TOOLS if t not in tools]}
    out = args.out or RESULTS_DIR / f"speed_e2e_{args.n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(dedup, peers, ratios))
    print()
    print(stage_table(dedup["stages_seconds"]))
    print(f"\nsaved {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as error:
        print(f"bench_e2e: {error}", file=sys.stderr)
        sys.exit(2)
