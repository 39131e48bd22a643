"""The teaching notebooks run top to bottom offline and show what they promise."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.slow
def test_step_saliency_notebook_runs_and_shows_the_maps():
    notebook = nbformat.read(NOTEBOOKS / "01_step_saliency.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    assert any("image/png" in out.get("data", {}) for out in outputs), "the step maps are drawn"
    printed = "".join(out.get("text", "") for out in outputs)
    assert "Trace: 199 tokens, 10 steps" in printed and "sum->thk" in printed
    pages = [out["data"]["text/html"] for out in outputs if "text/html" in out.get("data", {})]
    widgets = [page for page in pages if "CircuitsVis.render" in page]
    assert len(widgets) == 3, "trace.show(), result.show() and result.show('tokens') display widgets"
    assert all("var CircuitsVis=" in page and "unpkg" not in page for page in widgets)  # the local bundle
    assert any("StepSaliency(smollm2-135m: 30 layers x 10 steps" in page for page in pages)


def test_notebooks_are_built_from_their_sources():
    """The .ipynb files are what build_notebooks.py writes (no stale copies, no stored outputs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    stored = nbformat.read(NOTEBOOKS / "01_step_saliency.ipynb", as_version=4)
    assert [c.source for c in stored.cells] == [c.source for c in module.STEP_SALIENCY]
    assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code")
