"""`--descriptor torchscript`: a user-supplied TorchScript model (a tiny scripted one the test writes)."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import write_tar
from PIL import Image
from typer.testing import CliRunner

from dedup.cli import app
from dedup.descriptors import build_descriptor, vector_descriptor_names
from dedup.descriptors.torchscript import TorchScriptDescriptor
from dedup.errors import DedupError, ModelLoadError
from dedup.records import RunDir, load_embeddings


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.pool = torch.nn.AdaptiveAvgPool2d(4)
        self.head = torch.nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.conv(x)), 1))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    path = tmp_path_factory.mktemp("ts") / "tiny.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    return path, model


def _photo(seed: int, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth structure, so a re-encode stays close
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


def test_registered_and_built_by_name(model_file):
    assert "torchscript" in vector_descriptor_names()
    descriptor = build_descriptor("torchscript", pretrained=str(model_file[0]), image_size=32, device="cpu")
    assert descriptor.dim == 16 and descriptor.min_side == 32


def test_vectors_equal_the_model_on_normalised_pixels(model_file):
    path, model = model_file
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    descriptor = TorchScriptDescriptor(str(path), image_size=32, mean=mean, std=std, device="cpu")
    images = [_photo(1), _photo(2, (50, 90))]
    prepared = np.stack([descriptor.prepare(im) for im in images])
    assert prepared.shape == (2, 3, 32, 32) and prepared.dtype == np.uint8
    pixels = torch.stack([torch.from_numpy(np.asarray(im.resize((32, 32), Image.Resampling.BICUBIC))).permute(2, 0, 1)
                          for im in images]).float() / 255
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        reference = torch.nn.functional.normalize(model(normalised), dim=1).numpy()
    vectors = descriptor.embed(prepared)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    other = TorchScriptDescriptor(str(path), image_size=32, device="cpu").embed(prepared)
    assert np.abs(other - vectors).max() > 1e-3  # the normalisation option really applies


def test_crop_mode_takes_the_central_square(model_file):
    descriptor = TorchScriptDescriptor(str(model_file[0]), image_size=20, resize="crop", device="cpu")
    wide = Image.new("RGB", (60, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (20, 0, 40, 20))  # blue centre square, red sides
    prepared = descriptor.prepare(wide)
    assert prepared.shape == (3, 20, 20)
    assert prepared[2].min() > 200 and prepared[0].max() < 50


def test_bad_inputs_are_user_errors(model_file, tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        TorchScriptDescriptor(str(tmp_path / "missing.pt"))
    with pytest.raises(DedupError, match="mean"):
        TorchScriptDescriptor(str(model_file[0]), mean="1,2")
    not_a_model = tmp_path / "junk.pt"
    not_a_model.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError, match="cannot load"):
        _ = TorchScriptDescriptor(str(not_a_model), image_size=16, device="cpu").dim


def test_missing_torch_names_the_install(model_file, monkeypatch):
    import importlib.util
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    with pytest.raises(DedupError) as error:
        TorchScriptDescriptor(str(model_file[0]))
    assert "pip install 'dedup[clip]'" in error.value.hint
    monkeypatch.setattr(importlib.util, "find_spec", real)
    descriptor = TorchScriptDescriptor(str(model_file[0]), image_size=16, device="cpu")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(DedupError) as error:
        descriptor.embed(np.zeros((1, 3, 16, 16), np.uint8))
    assert "dedup[clip]" in error.value.hint


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def test_cli_run_with_a_torchscript_model_groups_a_reencoded_copy(model_file, tmp_path):
    photos = [_photo(10 + i, (96, 72)) for i in range(5)]
    members = [(f"k{i}.jpg", _jpeg(p, 95)) for i, p in enumerate(photos)] + [("copy.jpg", _jpeg(photos[2], 70))]
    shard = write_tar(tmp_path / "00000.tar", members)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(shard), "--out", str(out), "--descriptor", "torchscript",
                                      "--pretrained", str(model_file[0]), "--input-size", "32", "--device", "cpu",
                                      "--workers", "0", "--threshold", "torchscript=0.995", "--no-report"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "run.json").read_text())["descriptor_options"]["torchscript"]
    assert options["image_size"] == 32 and options["pretrained"] == str(model_file[0].resolve())
    _, vectors = load_embeddings(RunDir(out), "torchscript")
    assert vectors.shape == (6, 16)
    import pandas as pd

    clusters = pd.read_parquet(out / "clusters.parquet").set_index("key")
    assert clusters.loc["copy", "cluster_id"] == clusters.loc["k2", "cluster_id"]
    assert clusters["cluster_id"].nunique() >= 4
