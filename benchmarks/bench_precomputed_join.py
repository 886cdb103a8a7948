"""Precomputed vectors beside shards (`dedup run SHARDS --embeddings DIR`): the join's time, memory and answer.

    PYTHONPATH=. python benchmarks/bench_precomputed_join.py --samples 1e6 --memory 4GB

Builds, for each size, a run whose samples tables look like two img2dataset
outputs (``a/{i:05d}.tar`` and ``b/{i:05d}.tar``: the same shard names and the
same keys, other urls), and a clip-retrieval folder whose metadata names
* `--covered-a` of output a by image_path ``{i:05d}.tar/{key}.jpg`` plus url
  and sha256 (what clip-retrieval writes over img2dataset shards),
* `--covered-b` of output b by url and sha256 only (image_path a bare file name),
* 5% more rows of urls the run does not hold,
then runs the four join stages (`attach_precomputed`) in a child process and
prints wall and CPU seconds per stage, peak anonymous memory (what --memory
bounds) and whether every sample's status and vector row equal the planted
truth: shard_key for covered a, url for covered b, url_differs for an
uncovered b sample whose key a covered row names in a's shard of the same
name, no_vector otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anon_memory import communicate_sampled

PER_SHARD = 10_000


def _sha(values: np.ndarray, salt: str) -> list[str]:
    return [hashlib.sha256(f"{salt}{v}".encode()).hexdigest() for v in values]


def build(root: Path, samples: int, dim: int, memory: str, covered_a: float, covered_b: float,
          part_rows: int, seed: int) -> pd.DataFrame:
    """Write the run (shards, samples parts, run.json) and the folder; return the planted truth per sample."""
    from dedup.records import SAMPLES, record_shards, write_record
    from dedup.run import Run
    from dedup.settings import EngineSettings, Settings

    rng = np.random.default_rng(seed)
    per_output = samples // 2
    shards_per_output = max(1, per_output // PER_SHARD)
    urls = [f"{o}/{i:05d}.tar" for o in "ab" for i in range(shards_per_output)]
    settings = Settings.build(shard_specs=[str(root / "x")], descriptors=["perceptual"], memory=memory,
                              embeddings=str(root / "emb"), engine=EngineSettings(show_progress=False))
    run = Run.start(root / "run", settings)
    record_shards(run, [str(root / u) for u in urls])
    truth = []
    for shard_index, url in enumerate(urls):
        output, number = url[0], shard_index % shards_per_output
        rows = np.arange(PER_SHARD)
        keys = [f"{number:05d}{r:04d}" for r in rows]
        frame = pd.DataFrame({
            "sample_id": (np.int64(shard_index) << 32) + rows, "shard_index": np.int32(shard_index),
            "shard": str(root / url), "key": keys, "url": [f"https://{output}.example/{k}.jpg" for k in keys],
            "caption": "c", "sha256": _sha(rows, url), "status": "ok"})
        write_record(frame.reindex(columns=SAMPLES.names), run.samples_part(shard_index), SAMPLES)
        covered = rng.random(PER_SHARD) < (covered_a if output == "a" else covered_b)
        truth.append(frame[["sample_id", "key", "url", "sha256"]].assign(
            output=output, number=number, covered=covered))
    truth = pd.concat(truth, ignore_index=True)
    _write_folder(root / "emb", truth, dim, part_rows, rng)
    return _expected(truth)


def _write_folder(root: Path, truth: pd.DataFrame, dim: int, part_rows: int, rng) -> None:
    a = truth[(truth["output"] == "a") & truth["covered"]]
    b = truth[(truth["output"] == "b") & truth["covered"]]
    rows = pd.concat([
        pd.DataFrame({"image_path": [f"{n:05d}.tar/{k}.jpg" for n, k in zip(a["number"], a["key"], strict=True)],
                      "url": a["url"], "sha256": a["sha256"], "sample_id": a["sample_id"]}),
        pd.DataFrame({"image_path": [f"{k}.jpg" for k in b["key"]], "url": b["url"], "sha256": b["sha256"],
                      "sample_id": b["sample_id"]}),
        pd.DataFrame({"image_path": "x.jpg", "url": [f"https://gone.example/{i}" for i in range(len(truth) // 20)],
                      "sha256": None, "sample_id": -1}),
    ], ignore_index=True).sample(frac=1.0, random_state=1).reset_index(drop=True)
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for p, start in enumerate(range(0, len(rows), part_rows)):
        part = rows.iloc[start : start + part_rows]
        vectors = rng.standard_normal((len(part), dim), dtype=np.float32)
        np.save(root / "img_emb" / f"img_emb_{p}.npy", (vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
                .astype(np.float16))
        part.drop(columns=["sample_id"]).assign(caption="c").to_parquet(root / "metadata" / f"metadata_{p}.parquet")
    where = pd.DataFrame({"sample_id": rows["sample_id"], "part": np.arange(len(rows)) // part_rows,
                          "row": np.arange(len(rows)) % part_rows})
    placed = truth[["sample_id"]].merge(where[where["sample_id"] >= 0], on="sample_id", how="left")
    truth["part"], truth["row"] = placed["part"].to_numpy(), placed["row"].to_numpy()


def _expected(truth: pd.DataFrame) -> pd.DataFrame:
    covered_a = set(zip(truth.loc[(truth["output"] == "a") & truth["covered"], "number"],
                        truth.loc[(truth["output"] == "a") & truth["covered"], "key"], strict=True))
    named = [(n, k) in covered_a for n, k in zip(truth["number"], truth["key"], strict=True)]
    status = np.where(truth["covered"], np.where(truth["output"] == "a", "shard_key", "url"),
                      np.where((truth["output"] == "b") & np.array(named), "url_differs", "no_vector"))
    return truth.assign(expected=status)


CHILD = """
import json, sys, time, resource, threading
sys.path.insert(0, sys.argv[2])
from anon_memory import anon_bytes
import os
import dedup.stages.precomputed_join as join
from dedup.run import Run

current, peaks, stop = ["plan"], {}, threading.Event()
def sample():
    while not stop.is_set():
        now = anon_bytes(os.getpid()) or 0
        peaks[current[0]] = max(peaks.get(current[0], 0), now)
        stop.wait(0.02)
threading.Thread(target=sample, daemon=True).start()
engine_run_stage = join.run_stage
def named_run_stage(run, stage, *args, **kwargs):
    current[0] = stage.name
    return engine_run_stage(run, stage, *args, **kwargs)
join.run_stage = named_run_stage
started = time.perf_counter()
stats = join.attach_precomputed(Run.open(sys.argv[1]))
stop.set()
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"stats": stats, "wall_s": time.perf_counter() - started, "cpu_s": usage.ru_utime + usage.ru_stime,
                  "peak_anon_gib_by_step": {k: round(v / 2**30, 3) for k, v in peaks.items()}}))
"""


def run_join(root: Path) -> dict:
    here = str(Path(__file__).resolve().parent)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root / "run"), here], stdout=subprocess.PIPE, text=True)
    stdout, peak = communicate_sampled(proc)
    if proc.returncode:
        raise SystemExit(f"the join failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    stages = {}
    for stage in ("precomputed-keys", "precomputed-samples", "precomputed-join", "precomputed-parts"):
        markers = list((root / "run" / "_markers" / stage).glob("*.done"))
        stages[stage] = {"tasks": len(markers),
                         "task_s": round(sum(json.loads(m.read_text())["seconds"] for m in markers), 1)}
    return {**result, "peak_anon_gib": round(peak / 2**30, 3), "stages": stages}


def check(root: Path, truth: pd.DataFrame) -> dict:
    parts = sorted((root / "run" / "precomputed_coverage").glob("coverage_*.parquet"))
    got = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True).set_index("sample_id")
    got = got.reindex(truth["sample_id"])
    status_ok = (got["precomputed"].to_numpy() == truth["expected"].to_numpy())
    matched = truth["expected"].isin(["shard_key", "url"]).to_numpy()
    rows_ok = (got["precomputed_part"].to_numpy()[matched] == truth["part"].to_numpy()[matched]) & \
              (got["precomputed_row"].to_numpy()[matched] == truth["row"].to_numpy()[matched])
    return {"samples": len(truth), "status_wrong": int((~status_ok).sum()), "rows_wrong": int((~rows_ok).sum()),
            "by_status": got["precomputed"].value_counts().to_dict()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", default="1e6", help="comma-separated sample counts (two outputs, half each)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--memory", default="4GB")
    parser.add_argument("--covered-a", type=float, default=0.95)
    parser.add_argument("--covered-b", type=float, default=0.5)
    parser.add_argument("--part-rows", type=int, default=250_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/bench_precomputed_join")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    for n in (int(float(s)) for s in args.samples.split(",")):
        root = Path(args.workdir) / f"n{n}"
        shutil.rmtree(root, ignore_errors=True)
        started = time.perf_counter()
        truth = build(root, n, args.dim, args.memory, args.covered_a, args.covered_b, args.part_rows, args.seed)
        built = time.perf_counter() - started
        result = {"samples": n, "build_s": round(built, 1), **run_join(root), **check(root, truth)}
        print(json.dumps(result, default=str), flush=True)
        results.append(result)
        shutil.rmtree(root, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
