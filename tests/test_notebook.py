"""notebooks/explore_duplicates.ipynb runs top to bottom against a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from test_report import build_fixture_run

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


@pytest.mark.slow
def test_notebook_runs_on_a_run_directory(tmp_path):
    fixture = build_fixture_run(tmp_path / "data")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, km=_kernel_manager(tmp_path / "jupyter", fixture.root), timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    printed = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert f"run directory: {fixture.root.resolve()}" in printed
    assert "90 samples" in printed
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    # three top clusters, the copies distribution and one similarity histogram
    assert len(images) == 5
    assert "90 samples in" in printed and "dropped" in printed
