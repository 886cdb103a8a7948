"""Embed stage under faults: shards cut short, failing pipe: commands, HTTP errors, nothing decodable, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import jpeg_bytes, make_run, sample_members, write_tar
from PIL import Image

from dedup import pipeline
from dedup.errors import DedupError
from dedup.records import RunDir


def fast_run(shards, out):
    """A run that retries once at once and gives up on a stalled server after 2 s."""
    from dataclasses import replace

    run = make_run(out, shards, connect_timeout_s=2, read_timeout_s=2)
    run.settings = replace(run.settings, engine=replace(run.settings.engine, retries=1, retry_backoff_s=0))
    return run


def image(seed: int, size=(64, 64)) -> bytes:
    rng = np.random.default_rng(seed)
    return jpeg_bytes(Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)))


def shard(path: Path, keys: list[str], seed: int = 0) -> Path:
    return write_tar(path, [m for i, k in enumerate(keys) for m in sample_members(k, image(seed + i))])


def test_truncated_shard_keeps_its_samples_and_is_retried_next_run(tmp_path):
    good = shard(tmp_path / "00000.tar", [f"a{i}" for i in range(4)])
    full = shard(tmp_path / "full.tar", [f"b{i}" for i in range(5)], seed=10)
    with tarfile.open(full) as tar:
        cut_at = next(m.offset for m in tar.getmembers() if m.name == "b3.jpg")
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full.read_bytes()[:cut_at])  # a partial download ending at a member boundary
    out = tmp_path / "out"
    report = pipeline.embed(fast_run([str(good), str(cut)], out))
    run = RunDir(out)
    assert report.tasks_total == 2 and set(report.failures) == {"1"}
    assert report.stats["samples"] == 7  # 4 + the 3 readable ones
    assert pd.read_parquet(run.samples_part(1))["key"].tolist() == ["b0", "b1", "b2"]
    assert len(np.load(run.embedding_part("perceptual", 1))) == 3  # used by the index meanwhile
    assert not run.marker("embed", "1").exists()
    (row,) = pd.read_parquet(run.failed_shards).to_dict("records")
    assert row["status"] == "truncated" and row["url"] == str(cut) and row["attempts"] == 2
    assert str(cut) in row["error"]
    cut.write_bytes(full.read_bytes())  # the download completes
    report = pipeline.embed(fast_run([str(good), str(cut)], out))
    assert report.tasks_run == 1 and not report.failures and not run.failed_shards.exists()
    assert pd.read_parquet(run.samples_part(1))["key"].tolist() == [f"b{i}" for i in range(5)]


def test_pipe_shard_failing_once_is_retried_within_the_run(tmp_path):
    source = shard(tmp_path / "src.tar", ["k0", "k1"])
    counter = tmp_path / "attempts"
    spec = f"pipe:sh -c 'echo x >> {counter}; [ $(wc -l < {counter}) -ge 2 ] || exit 1; cat {source}'"
    report = pipeline.embed(fast_run([spec], tmp_path / "out"))
    assert not report.failures and report.stats["status.ok"] == 2
    assert counter.read_text().count("x") == 2


def test_http_500_shard_is_recorded_with_url_and_status(tmp_path):
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(500, "backend exploded")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/00001.tar"
    try:
        report = pipeline.embed(fast_run([str(shard(tmp_path / "00000.tar", ["k0"])), url], tmp_path / "out"))
    finally:
        server.shutdown()
        server.server_close()
    (row,) = pd.read_parquet(RunDir(tmp_path / "out").failed_shards).to_dict("records")
    assert row["status"] == "http_error" and row["url"] == url
    assert f"{url}: HTTP 500" in row["error"] and "curl" not in row["error"]
    assert report.failures["1"].attempts == 2


def test_run_where_nothing_decodes_is_an_error_with_a_hint(tmp_path):
    members = [("k0.jpg", b"<html>404</html>"), ("k1.jpg", b"")]
    bad = write_tar(tmp_path / "00000.tar", members)
    with pytest.raises(DedupError, match="no image decoded") as info:
        pipeline.embed(fast_run([str(bad)], tmp_path / "out"))
    assert "decode_error" in info.value.message and info.value.hint


def test_keys_repeated_across_shards_are_counted(tmp_path):
    # Two img2dataset outputs: both number their keys from 000000000 and both hold a 00000.tar.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = shard(tmp_path / "a" / "00000.tar", ["000000000", "000000001"])
    second = shard(tmp_path / "b" / "00000.tar", ["000000000", "000000002"], seed=5)
    report = pipeline.embed(fast_run([str(first), str(second)], tmp_path / "out"))
    assert report.stats["keys.in_several_shards"] == 1
    assert report.stats["samples"] == 4


# ---------------------------------------------------------------- Ctrl-C


def _slow_shards(root: Path, count: int) -> list[str]:
    """Shards of large flat PNGs: tiny files that take a decode worker a while each."""
    import io

    root.mkdir()
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (3, 40, 90)).save(buffer, format="PNG")  # 33 KB, ~0.5 s to decode
    members = [m for i in range(4) for m in sample_members(f"k{i}", buffer.getvalue(), ext="png")]
    return [str(write_tar(root / f"{s:05d}.tar", members)) for s in range(count)]


def _embed_process(specs: list[str], out: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dedup.cli", "embed", *specs, "--out", str(out), "--descriptor", "perceptual", "--workers", "2"]
    # Its own process group, so that the test can do what a terminal's Ctrl-C does: SIGINT to every process of it.
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=_as_from_a_terminal,
                            env={**os.environ, "COLUMNS": "200", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})


def _as_from_a_terminal() -> None:
    """SIGINT as an interactive shell leaves it for a command: default, unblocked.

    Both are inherited across exec, and a test run started in the background by a non-interactive shell
    (`pytest ... &`, as long CI jobs are) has SIGINT ignored: dedup then rightly keeps ignoring it, as every
    program started with `&` does, and the run went on to its end or hung behind the gate.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


@pytest.mark.slow
def test_first_ctrl_c_stops_within_seconds_and_a_rerun_resumes(tmp_path):
    specs = _slow_shards(tmp_path / "shards", 5)
    # The last shard is held back until the test opens the gate, so the run cannot end before the interrupt
    # lands, however a loaded machine schedules the decode pool and the writer (on loaded CI machines a run of
    # slow shards alone sometimes ended before the first marker was seen).
    gate = tmp_path / "gate"
    gate.touch()
    specs.append(f"pipe:sh -c 'while [ -e {gate} ]; do sleep 0.1; done; cat {specs[0]}'")
    out = tmp_path / "out"
    proc = _embed_process(specs, out)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / "_markers" / "embed").glob("*.done")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    sent = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - sent < 15  # seconds, not the minutes of a pool draining its queue
    assert proc.returncode == 130 and b"interrupted; rerun the same command to resume" in stderr, stderr.decode()[-2000:]
    assert b"Traceback" not in stderr
    done = len(list((out / "_markers" / "embed").glob("*.done")))
    assert 1 <= done < len(specs), "the interrupt must land mid-run for this test to mean anything"
    gate.unlink()
    rerun = _embed_process(specs, out)
    _, stderr = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, stderr.decode()
    assert f"{done} already done".encode() in stderr
    assert len(list((out / "_markers" / "embed").glob("*.done"))) == len(specs)


def test_local_model_files_are_recorded_as_absolute_paths(tmp_path, monkeypatch):
    from dedup.settings import Settings
    from dedup.stages.embed import descriptor_builders

    def builders(model, pretrained):
        return descriptor_builders(Settings.build(descriptors=["clip"], model_options={"model": model, "pretrained": pretrained}))

    monkeypatch.chdir(tmp_path)
    Path("weights.pt").write_bytes(b"checkpoint")
    (clip,) = builders("ViT-B-32", "weights.pt")
    assert clip.options["pretrained"] == str(tmp_path / "weights.pt") and clip.options["model"] == "ViT-B-32"
    (tagged,) = builders("ViT-B-32", "laion2b_s34b_b79k")
    assert tagged.options["pretrained"] == "laion2b_s34b_b79k"


def test_allow_missing_records_gaps_in_a_brace_range_and_a_rerun_adds_them(tmp_path):
    from typer.testing import CliRunner

    from dedup.cli import app

    for index in (0, 2):
        shard(tmp_path / f"{index:05d}.tar", [f"k{index}"])
    spec = str(tmp_path / "{00000..00002}.tar")
    out = tmp_path / "out"
    args = ["embed", spec, "--out", str(out), "--descriptor", "perceptual", "--workers", "0", "--no-progress"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "00001.tar" in refused.output and "--allow-missing" in refused.output
    result = CliRunner().invoke(app, [*args, "--allow-missing"])
    assert result.exit_code == 0, result.output
    assert pd.read_parquet(out / "missing_shards.parquet")["url"].tolist() == [str(tmp_path / "00001.tar")]
    assert len(pd.read_parquet(out / "shards.parquet")) == 2
    shard(tmp_path / "00001.tar", ["k1"])  # the download finally succeeded
    again = CliRunner().invoke(app, [*args, "--allow-missing"])
    assert again.exit_code == 0, again.output
    shards = pd.read_parquet(out / "shards.parquet")["url"].tolist()
    assert shards[-1] == str(tmp_path / "00001.tar") and len(shards) == 3  # appended: ids of the others unchanged
    assert not (out / "missing_shards.parquet").exists()


WORKER_PROBE = '''
import json, sys
from dedup.cli import app  # as the `dedup` console script does: spawn runs this file again in every worker
if __name__ == "__main__":
    from dedup.descriptors import builder_options
    from dedup.descriptors.base import DescriptorBuilder
    from dedup.stages.embed import EmbedStage
    from dedup.stages.embed_worker import process_chunk
    from dedup.stages.read import ShardStream
    builders = [DescriptorBuilder("perceptual", builder_options("perceptual", {"device": "cpu"}))]
    stage = EmbedStage(None, [], builders, workers=1)
    pool = stage._get_pool()
    processed = pool.apply(process_chunk, (list(ShardStream(sys.argv[1], 0)), stage.builders, 10**8))
    modules = pool.apply(eval, ("sorted(__import__('sys').modules)",))
    stage.close()
    heavy = sorted({m.split(".")[0] for m in modules} & {"pandas", "pyarrow", "torch", "faiss"})
    print(json.dumps({"heavy": heavy, "rows": [p.row for p in processed]}))
'''


def test_decode_workers_start_without_pandas_pyarrow_or_torch(tmp_path):
    """pandas + pyarrow cost a spawned worker ~1 s of CPU; a worker needs neither to decode."""
    import json

    from dedup.records import SAMPLES

    probe = tmp_path / "probe.py"
    probe.write_text(WORKER_PROBE)
    tar = shard(tmp_path / "00000.tar", ["a0", "a1"])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, str(probe), str(tar)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["heavy"] == []
    assert [list(row) for row in result["rows"]] == [SAMPLES.names] * 2  # every column, in the schema's order
    assert [row["status"] for row in result["rows"]] == ["ok", "ok"]


def _stage(out: Path, shards: list[Path], prefetch: bool, workers: int = 1):
    from dedup.descriptors import builder_options
    from dedup.descriptors.base import DescriptorBuilder
    from dedup.stages.embed import EmbedStage

    builders = [DescriptorBuilder("perceptual", builder_options("perceptual", {"device": "cpu"}))]
    return EmbedStage(RunDir(out), [str(s) for s in shards], builders, workers=workers, prefetch=prefetch)


def _parts(out: Path, shards: int) -> list[tuple[pd.DataFrame, np.ndarray]]:
    run = RunDir(out)
    return [(pd.read_parquet(run.samples_part(i)), np.load(run.embedding_part("perceptual", i))) for i in range(shards)]


def test_the_next_shard_is_decoding_while_a_shard_drains_and_outputs_do_not_change(tmp_path):
    """Workers would idle at every shard's end (last chunks, then the writes) without the prefetch."""
    shards = [shard(tmp_path / f"{i:05d}.tar", [f"s{i}_{k}" for k in range(70)], seed=100 * i) for i in range(3)]
    stage = _stage(tmp_path / "prefetch", shards, prefetch=True)
    try:
        stage.run_task("0", lambda n: None)
        assert stage._next is not None and stage._next.shard_index == 1 and stage._next.window  # already submitted
        stage.run_task("1", lambda n: None)
        stage.run_task("2", lambda n: None)
        assert stage._next is None  # no shard after the last
    finally:
        stage.close()
    plain = _stage(tmp_path / "plain", shards, prefetch=False, workers=0)
    for task in ("0", "1", "2"):
        plain.run_task(task, lambda n: None)
    for (rows, vectors), (plain_rows, plain_vectors) in zip(_parts(tmp_path / "prefetch", 3),
                                                            _parts(tmp_path / "plain", 3), strict=True):
        assert rows.equals(plain_rows) and len(rows) == 70
        assert np.array_equal(vectors, plain_vectors)


def test_prefetch_skips_a_shard_done_earlier_and_drops_one_that_is_not_asked_for(tmp_path):
    shards = [shard(tmp_path / f"{i:05d}.tar", [f"s{i}_{k}" for k in range(40)], seed=100 * i) for i in range(3)]
    out = tmp_path / "out"
    stage = _stage(out, shards, prefetch=True)
    try:
        marker = RunDir(out).marker("embed", "1")
        marker.parent.mkdir(parents=True)
        marker.write_text("{}")  # shard 1 finished in an earlier run: the engine will not ask for it
        stage.run_task("0", lambda n: None)
        assert stage._next is None
        marker.unlink()
        stage.run_task("0", lambda n: None)  # a retry of shard 0: shard 1 is prefetched meanwhile
        assert stage._next is not None and stage._next.shard_index == 1
        stage.run_task("2", lambda n: None)  # not the prefetched shard: it is dropped, shard 2 is read afresh
        assert stage._next is None
    finally:
        stage.close()
    rows = pd.read_parquet(RunDir(out).samples_part(2))
    assert rows["key"].tolist() == [f"s2_{k}" for k in range(40)] and (rows["status"] == "ok").all()


def test_decode_workers_are_sent_offsets_not_image_bytes_and_outputs_do_not_change(tmp_path, monkeypatch):
    import pickle
    from types import SimpleNamespace

    shards = [shard(tmp_path / "00000.tar", [f"k{i}" for i in range(40)])]
    sent: list[bytes] = []

    class InlinePool:  # what the pool's pipes would carry, then the worker's own call
        def apply_async(self, function, args):
            sent.append(pickle.dumps(args[0]))
            result = function(pickle.loads(sent[-1]), *args[1:])
            return SimpleNamespace(get=lambda: result)

    stage = _stage(tmp_path / "pool", shards, prefetch=False, workers=1)
    monkeypatch.setattr(stage, "_get_pool", lambda: InlinePool())
    stage.run_task("0", lambda n: None)
    chunks = [pickle.loads(payload) for payload in sent]
    assert sum(len(chunk) for chunk in chunks) == 40
    assert all(raw.image_bytes is None and raw.deferred is not None for chunk in chunks for raw in chunk)
    image_bytes = sum(len(image(i)) for i in range(40))
    assert sum(map(len, sent)) < image_bytes / 4  # headers, captions and metadata only
    plain = _stage(tmp_path / "plain", shards, prefetch=False, workers=0)
    plain.run_task("0", lambda n: None)
    [(rows, vectors)], [(plain_rows, plain_vectors)] = _parts(tmp_path / "pool", 1), _parts(tmp_path / "plain", 1)
    assert rows.equals(plain_rows) and np.array_equal(vectors, plain_vectors)
    data = shards[0].read_bytes()
    spans = zip(rows["image_offset"], rows["image_bytes"], strict=True)
    assert all(data[o : o + n] == image(i) for i, (o, n) in enumerate(spans))
