"""Image and text queries on a run from precomputed embeddings: the query names the model that made them.

The embeddings are made here by a tiny open_clip model with random weights (no download), written in the
clip-retrieval layout, and run with `dedup run --embeddings`; counts are checked against a brute-force scan.
"""

from __future__ import annotations

import numpy as np
import open_clip
import pandas as pd
import pytest
import torch
from conftest import jpeg_bytes
from PIL import Image
from test_clip import TINY_CONFIG, write_config
from typer.testing import CliRunner

from dedup.cli import app
from dedup.descriptors.clip import ClipDescriptor
from dedup.errors import QueryError
from dedup.pipeline import run_from_embeddings
from dedup.run import Run
from dedup.settings import EngineSettings, Settings
from dedup.stages.query import query

COPIES = 3  # rows of the folder that hold the vectors of the queried image
CUT = 0.999
NAME = "dedup-test-precomputed-clip"


def _picture(seed: int) -> Image.Image:
    """A blocky picture (not per-pixel noise), so JPEG keeps it and distinct seeds differ in structure."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize((96, 96), Image.Resampling.NEAREST)


@pytest.fixture(scope="module")
def made(tmp_path_factory, single_faiss_thread):
    """A precomputed folder embedded by the tiny model, its run, the model's options and the stored vectors."""
    root = tmp_path_factory.mktemp("precomputed_query")
    config = write_config(root, NAME, TINY_CONFIG)
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    model = open_clip.create_model(NAME)
    checkpoint = root / "tiny.pt"
    torch.save(model.state_dict(), checkpoint)
    options = {"model": str(config), "pretrained": str(checkpoint), "device": "cpu"}
    clip = ClipDescriptor(**options, precision="fp32")
    images = [_picture(seed) for seed in range(30)]
    (root / "query.jpg").write_bytes(jpeg_bytes(images[0], quality=95))
    rows = [*images, *[images[0]] * (COPIES - 1)]  # the queried picture stored COPIES times, as LAION repeats
    vectors = clip.embed(np.stack([clip.prepare(image) for image in rows])).astype(np.float16)
    (root / "emb" / "img_emb").mkdir(parents=True)
    (root / "emb" / "metadata").mkdir()
    np.save(root / "emb" / "img_emb" / "img_emb_0.npy", vectors)
    n = len(rows)
    pd.DataFrame({"key": [f"k{i}" for i in range(n)], "url": [f"https://e.example/{i}.jpg" for i in range(n)],
                  "caption": [f"picture {i}" for i in range(n)]}).to_parquet(root / "emb" / "metadata" / "metadata_0.parquet")
    # A tiny model with random weights puts every blocky picture above 0.99 to every other (the stored copies
    # of the queried one score 0.9999), so the run's cut is raised to where copies and other pictures part.
    run = Run.start(root / "run", Settings.build(shard_specs=[str(root / "emb")], descriptors=["precomputed"],
                                                 thresholds={"precomputed": CUT}, memory="1GB",
                                                 engine=EngineSettings(show_progress=False)))
    run_from_embeddings(run, with_report=False)
    return {"root": root, "run": root / "run", "options": options, "clip": clip, "vectors": vectors.astype(np.float32)}


def _oracle(vectors: np.ndarray, query_vector: np.ndarray, cut: float) -> set[str]:
    scores = vectors @ np.asarray(query_vector, np.float32)
    return {f"k{i}" for i in np.flatnonzero(scores >= np.float32(cut))}


def test_image_query_on_precomputed_vectors_counts_what_a_brute_force_scan_counts(made):
    (result,) = query(made["run"], image=made["root"] / "query.jpg", model_options=made["options"])
    clip = made["clip"]
    decoded = Image.open(made["root"] / "query.jpg").convert("RGB")
    expected = _oracle(made["vectors"], clip.embed(clip.prepare(decoded)[None])[0], CUT)
    assert expected == {"k0", *(f"k{30 + i}" for i in range(COPIES - 1))}  # the cut parts copies from the rest
    assert set(result.matches["key"]) == expected and result.copies == len(expected)
    assert result.descriptor == "precomputed"


def test_text_query_on_precomputed_vectors_is_the_exact_scan(made):
    text_vector = made["clip"].embed_text(["a picture"])[0]
    scores = made["vectors"] @ text_vector
    cut = float(np.median(scores))  # half the stored images at or above it
    (result,) = query(made["run"], text="a picture", min_similarity=cut, model_options=made["options"])
    assert result.copies == int((scores >= np.float32(cut)).sum()) and result.min_similarity == cut
    assert result.matches["similarity"].iloc[0] == pytest.approx(float(scores.max()), abs=2e-3)


def test_image_query_without_the_model_names_the_flags(made):
    with pytest.raises(QueryError, match="made outside dedup") as info:
        query(made["run"], image=made["root"] / "query.jpg")
    assert "--model" in info.value.hint
    cli = CliRunner().invoke(app, ["query", str(made["run"]), "--image", str(made["root"] / "query.jpg")])
    assert cli.exit_code == 2 and "--model" in cli.output and "Traceback" not in cli.output


def test_a_model_of_another_dimension_is_refused(made, tmp_path):
    other = write_config(tmp_path, "dedup-test-wider-clip", {**TINY_CONFIG, "embed_dim": 48})
    open_clip.add_model_config(other)
    torch.manual_seed(2)
    torch.save(open_clip.create_model("dedup-test-wider-clip").state_dict(), tmp_path / "wide.pt")
    options = {"model": str(other), "pretrained": str(tmp_path / "wide.pt"), "device": "cpu"}
    with pytest.raises(QueryError, match="48-d vectors, the run's 'precomputed' vectors are 32-d"):
        query(made["run"], image=made["root"] / "query.jpg", model_options=options)


def test_cli_query_with_model_and_the_flags_rules(made):
    args = ["query", str(made["run"]), "--image", str(made["root"] / "query.jpg"), "--json"]
    model = ["--model", made["options"]["model"], "--pretrained", made["options"]["pretrained"], "--device", "cpu"]
    ok = CliRunner().invoke(app, [*args, *model])
    assert ok.exit_code == 0, ok.output
    assert '"copies": ' in ok.stdout and '"descriptor": "precomputed"' in ok.stdout
    alone = CliRunner().invoke(app, [*args, "--pretrained", made["options"]["pretrained"]])
    assert alone.exit_code == 2 and "--model" in alone.output


def test_model_flags_on_a_run_dedup_embedded_are_refused(demo_session_run):
    run, *_ = demo_session_run
    with pytest.raises(QueryError, match="run's own settings"):
        query(run.root, key="anything", model_options={"model": "ViT-B-32"})
