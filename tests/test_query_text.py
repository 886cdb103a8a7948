"""`dedup query OUT --text`: an exact, uncapped count above --min-similarity, plus the top matches (tiny open_clip)."""

from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from conftest import make_run
from test_clip import TINY_CONFIG
from typer.testing import CliRunner

from dedup import pipeline
from dedup.cli import app
from dedup.descriptors.clip import ClipDescriptor
from dedup.records import RunDir, load_embeddings
from dedup.stages.query import TEXT_TOP, default_text_min_similarity, query
from dedup.synth import build_demo

PROMPT = "a lighthouse behind a fence"


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_query")
    config = root / "dedup-test-text-clip.json"
    config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(1)
    checkpoint = root / "tiny.pt"
    torch.save(open_clip.create_model("dedup-test-text-clip").state_dict(), checkpoint)
    shards, _ = build_demo(root / "shards")
    run = make_run(root / "run", shards, descriptors=["clip"], device="cpu",
                   model_options={"model": str(config), "pretrained": str(checkpoint)})
    pipeline.run_all(run, with_report=False)
    describer = ClipDescriptor(model=str(config), pretrained=str(checkpoint), device="cpu")
    ids, vectors = load_embeddings(RunDir(root / "run"), "clip")
    scores = vectors @ describer.embed_text([PROMPT])[0]
    return {"run": root / "run", "ids": ids, "scores": scores}


def test_count_is_an_exact_uncapped_scan(clip_run):
    scores = clip_run["scores"]
    cut = float(np.sort(scores)[len(scores) // 4])  # three quarters of the images lie above: far more than TEXT_TOP
    (result,) = query(clip_run["run"], text=PROMPT, min_similarity=cut)
    expected = int((scores.astype(np.float32) >= np.float32(cut)).sum())
    assert expected > TEXT_TOP
    assert result.copies == expected
    assert result.min_similarity == cut


def test_top_matches_are_the_best_scores_in_order(clip_run):
    (result,) = query(clip_run["run"], text=PROMPT, min_similarity=0.0)
    order = np.argsort(-clip_run["scores"], kind="stable")[:TEXT_TOP]
    assert result.matches["sample_id"].tolist()[:5] == clip_run["ids"][order][:5].tolist()
    np.testing.assert_allclose(result.matches["similarity"], clip_run["scores"][order], atol=1e-5)
    assert len(result.matches) == TEXT_TOP


def test_default_min_similarity_is_documented_per_model(clip_run):
    assert default_text_min_similarity("ViT-B-32") == 0.28
    assert default_text_min_similarity("ViT-L-14") == 0.26
    (result,) = query(clip_run["run"], text=PROMPT)
    assert result.min_similarity == default_text_min_similarity("unknown-model")
    assert result.copies == int((clip_run["scores"].astype(np.float32) >= np.float32(0.28)).sum())


def test_cli_json_reports_the_count_and_cut(clip_run):
    result = CliRunner().invoke(app, ["query", str(clip_run["run"]), "--text", PROMPT, "--min-similarity", "-1", "--json"])
    assert result.exit_code == 0, result.output
    (answer,) = json.loads(result.stdout)
    assert answer["copies"] == len(clip_run["ids"]) and answer["min_similarity"] == -1.0
