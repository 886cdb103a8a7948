"""notebooks/explore_duplicates.ipynb runs top to bottom on the output of the real `dedup demo` pipeline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pandas as pd
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from typer.testing import CliRunner

from dedup.cli import app
from dedup.synth import DEMO_SAMPLES

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_duplicates.ipynb"
KERNEL_NAME = "python3"


def _kernel_manager(spec_root: Path, run_dir: Path) -> KernelManager:
    """A kernel in *this* interpreter, whatever kernels the machine has registered.

    A private kernel spec (argv = sys.executable) cannot pick up a stale user-wide
    'python3' spec pointing at another environment, and needs no `ipykernel install`.
    """
    spec_dir = spec_root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "dedup test kernel",
        "language": "python",
        "env": {"DEDUP_RUN": str(run_dir), "MPLBACKEND": "module://matplotlib_inline.backend_inline"},
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(spec_root / "kernels")])
    return KernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=specs)


def _demo_run(base: Path) -> Path:
    """Shards + every pipeline stage, exactly what `make demo` runs (perceptual descriptor, CPU)."""
    result = CliRunner().invoke(app, ["demo", "--out", str(base), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return base / "run"


@pytest.mark.slow
def test_notebook_runs_on_the_demo_run(tmp_path):
    run_dir = _demo_run(tmp_path / "demo_out")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=_kernel_manager(tmp_path / "jupyter", run_dir), timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"run directory: {run_dir.resolve()}" in printed
    assert f"{DEMO_SAMPLES} samples" in printed
    removed = len(pd.read_parquet(run_dir / "remove_keys.parquet"))
    assert f"{DEMO_SAMPLES} samples in, {DEMO_SAMPLES - removed} out, {removed} dropped" in printed
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # three top clusters, the copies distribution and the perceptual similarity histogram
    assert len(images) == 5
