"""The lean install: everything but CLIP works without torch, torchvision and open_clip.

The venv here has torch, so each check runs in a subprocess whose `sitecustomize`
blocks those imports (spawned decode workers start with it too), which is what
`pip install dedup` without the clip extra gives.
"""

from __future__ import annotations

import ast
import importlib.metadata
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import faiss
import pandas as pd
import pytest
from conftest import REPO, jpeg_bytes, sample_members, write_tar
from PIL import Image

import dedup
from dedup.errors import MissingExtraError, missing_extra, require
from dedup.search.faiss_index import faiss_backend, faiss_gpu_count

CLIP_STACK = ("torch", "torchvision", "open_clip")
# The modules of the clip extra: the descriptor and its batched GPU decoding / CUDA-graph helpers.
CLIP_MODULES = ("dedup.descriptors.clip", "dedup.descriptors.gpu_decode", "dedup.descriptors.cuda_graphs")
BLOCKER = f'''
import importlib.abc
import sys


class _NoClipExtra(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in {CLIP_STACK!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None


sys.meta_path.insert(0, _NoClipExtra())
'''


def run_lean(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    site = tmp_path / "lean_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "COLUMNS": "200"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=timeout, check=False)


def small_shard(tmp_path: Path) -> Path:
    """Four demo photos, one of them twice: enough for every stage to have something to do."""
    photos = sorted((REPO / "dedup" / "demo_images").glob("kodim0*.jpg"))[:3]
    images = [jpeg_bytes(Image.open(path).reduce(4)) for path in photos]
    members = []
    for i, image in enumerate([*images, images[0]]):
        members += sample_members(f"{i:09d}", image)
    return write_tar(tmp_path / "00000.tar", members)


def test_blocker_really_hides_the_clip_stack(tmp_path):
    result = run_lean(tmp_path, "-c", "import torch")
    assert result.returncode == 1
    assert "No module named 'torch'" in result.stderr


def test_every_module_but_clip_imports_without_torch(tmp_path):
    names = [m.name for m in pkgutil.walk_packages(dedup.__path__, "dedup.") if m.name not in CLIP_MODULES]
    code = "import importlib, sys\n" + "".join(f"importlib.import_module({n!r})\n" for n in names)
    code += f"assert not {{*sys.modules}} & {set(CLIP_STACK)!r}\nprint('imported', {len(names)})"
    result = run_lean(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert f"imported {len(names)}" in result.stdout
    assert {"dedup.cli", "dedup.pipeline", "dedup.stages.embed", "dedup.stages.query", "dedup.loader"} <= set(names)


@pytest.mark.slow
def test_default_run_is_perceptual_without_torch(tmp_path):
    shard = small_shard(tmp_path)
    result = run_lean(tmp_path, "-m", "dedup.cli", "run", str(shard), "--out", "run", "--workers", "0", "--no-report")
    assert result.returncode == 0, result.stderr
    assert "descriptors: perceptual" in result.stderr
    clusters = pd.read_parquet(tmp_path / "run" / "clusters.parquet")
    assert clusters["cluster_size"].max() == 2  # the photo stored twice
    assert len(clusters) == 4


@pytest.mark.slow
def test_clip_without_the_extra_is_a_two_line_error(tmp_path):
    shard = small_shard(tmp_path)
    result = run_lean(tmp_path, "-m", "dedup.cli", "run", str(shard), "--out", "run", "--descriptor", "clip",
                      "--workers", "0")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-2:] == [
        "error: The clip descriptor needs the 'open_clip_torch' package, which is not installed.",
        "hint: pip install 'dedup[clip]'",
    ]


def test_missing_extra_names_a_transitive_module_and_a_broken_one():
    absent = missing_extra(ModuleNotFoundError("No module named 'timm'", name="timm"), "clip", "The clip descriptor")
    assert absent.message == "The clip descriptor needs the 'timm' package, which is not installed."
    assert absent.hint == "pip install 'dedup[clip]'"
    broken = missing_extra(ImportError("libcudart.so.12: cannot open shared object file", name="torch"), "clip", "CLIP")
    assert "installed but fails to import: libcudart.so.12" in broken.message
    assert broken.hint == "pip install --upgrade 'dedup[clip]'"


def test_require_reports_a_module_that_fails_to_load(monkeypatch, tmp_path):
    (tmp_path / "broken_extra_mod.py").write_text("raise ImportError('undefined symbol: cblas_sgemm')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as info:
        require("broken_extra_mod", "broken-extra", "ray", "the Ray engine")
    assert "fails to import: undefined symbol" in info.value.message
    assert info.value.hint == "pip install --upgrade 'dedup[ray]'"


def test_faiss_backend_reports_the_installed_build(monkeypatch):
    if hasattr(faiss, "StandardGpuResources"):
        pytest.skip("faiss-gpu is installed here")
    assert faiss_backend() == "faiss-cpu"
    assert faiss_gpu_count() == 0
    monkeypatch.setattr(faiss, "StandardGpuResources", object, raising=False)
    for gpus, line in ((0, "faiss-gpu with 0 GPUs"), (1, "faiss-gpu with 1 GPU"), (2, "faiss-gpu with 2 GPUs")):
        monkeypatch.setattr(faiss, "get_num_gpus", lambda gpus=gpus: gpus)
        assert faiss_backend() == line
        assert faiss_gpu_count() == gpus


# ---------------------------------------------------------------- pyproject


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the checks are the same on 3.10
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _requirement_names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~ \[;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in requirements}


def _is_require_call(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "require"
            and bool(node.args) and isinstance(node.args[0], ast.Constant))


def _direct_imports() -> set[str]:
    """Top-level third-party modules that dedup's own files import, at any depth."""
    names = set()
    for path in (REPO / "dedup").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.partition(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.partition(".")[0])
            elif _is_require_call(node):  # require("ray", ...): an optional import by name
                names.add(node.args[0].value.partition(".")[0])
    return {n for n in names if n != "dedup" and n not in sys.stdlib_module_names and n != "__future__"}


def test_pyproject_declares_what_dedup_imports_and_the_base_has_no_torch():
    project = _pyproject()["project"]
    base = _requirement_names(project["dependencies"])
    extras = {name: _requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    distributions = importlib.metadata.packages_distributions()
    imported = {dist.lower().replace("_", "-") for m in _direct_imports() for dist in distributions[m]}
    declared = base.union(*extras.values())
    assert imported - declared == set()
    # Nothing in the base install that dedup never imports, but webdataset: DropDuplicates is a webdataset
    # pipeline stage, used inside wds.WebDataset(...).compose(...) without importing it.
    assert base - {"webdataset"} <= imported
    assert {"braceexpand", "huggingface-hub", "fsspec", "ray"} <= imported
    assert base & {"torch", "torchvision", "open-clip-torch", "ray"} == set()
    assert {"torch", "torchvision", "open-clip-torch"} <= extras["clip"]
    assert "gpu" not in extras  # faiss-gpu replaces faiss-cpu (same module): an extra cannot add it


def test_package_data_names_only_files_that_exist():
    patterns = _pyproject()["tool"]["setuptools"]["package-data"]["dedup"]
    for pattern in patterns:
        assert list((REPO / "dedup").glob(pattern)), pattern


def test_unknown_pytest_marker_is_an_error(tmp_path):
    (tmp_path / "test_typo.py").write_text("import pytest\n\n\n@pytest.mark.slwo\ndef test_x():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "pyproject.toml"), "--rootdir",
                             str(tmp_path), "-p", "no:cacheprovider", str(tmp_path)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode != 0
    assert "'slwo' not found in `markers` configuration option" in result.stdout + result.stderr


def test_public_api_and_the_old_import_path():
    from dedup import DropDuplicates, __version__, query, run_all
    from dedup.loader import DropDuplicates as loader_filter
    from dedup.manifests import DropDuplicates as old_path
    from dedup.pipeline import run_all as pipeline_run_all
    from dedup.stages.query import query as stage_query

    assert DropDuplicates is loader_filter is old_path
    assert (run_all, query) == (pipeline_run_all, stage_query)
    assert __version__ == _pyproject()["project"]["version"]  # the source-checkout fallback must not drift
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = dedup.Nope
