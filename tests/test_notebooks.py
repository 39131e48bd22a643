"""The teaching notebooks run top to bottom offline and show what they promise."""

import re
import shutil
from pathlib import Path

import nbformat
import pytest
from conftest import pinned_stack_only
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


@pytest.mark.slow
def test_step_saliency_notebook_runs_and_shows_the_maps():
    notebook = nbformat.read(NOTEBOOKS / "01_step_saliency.ipynb", as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
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
    assert_no_progress_warning(outputs)
    # the solutions: the block / causal ratio on the diagonal is (n + 1) / (2n), step by step
    ratio = re.search(r"block / causal on the diagonal: \[([\d., ]+)\]", printed).group(1).split(", ")
    expected = re.search(r"\(n \+ 1\) / \(2n\): +\[([\d., ]+)\]", printed).group(1).split(", ")
    assert ratio == expected and len(ratio) == 10
    assert "summary " in printed and "answer " in printed  # exercise 1's three targets


def assert_no_progress_warning(outputs: list) -> None:
    """tqdm's notebook bar needs ipywidgets (pinned); without it every notebook opened with a warning."""
    streams = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "TqdmWarning" not in streams and "IProgress not found" not in streams


def run_notebook(name: str, folder) -> tuple[str, list]:
    """Execute a notebook in ``folder`` (it writes files there); its printed text and outputs."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3",
                   resources={"metadata": {"path": str(folder)}}).execute()
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]
    assert not [out for out in outputs if out.output_type == "error"]
    printed = "".join(out.get("text", "") + out.get("data", {}).get("text/plain", "") for out in outputs)
    assert_no_progress_warning(outputs)
    return printed, outputs


@pinned_stack_only
@pytest.mark.slow
def test_layer_ablation_notebook(tmp_path):
    printed, outputs = run_notebook("02_layer_ablation.ipynb", tmp_path)
    plain, knocked = (float(v) for v in re.search(r"summary loss: plain ([\d.]+), summary->thinking knocked out "
                                                   r"([\d.]+)", printed).groups())
    assert knocked > plain + 0.5, "the summary needs its thinking"
    assert any("image/png" in out.get("data", {}) for out in outputs)
    assert "loss per knocked-out head" in printed


@pinned_stack_only
@pytest.mark.slow
def test_stepflow_notebook_shows_what_each_hook_changes(tmp_path):
    printed, _ = run_notebook("03_stepflow.ipynb", tmp_path)
    assert "stepflow  question mass of thinking rows" in printed
    assert re.search(r"stepflow  question mass of thinking rows: .* rows below 0.15: 0%", printed)
    changed = re.search(r"positions SMI changed: \[([\d, ]*)\]", printed).group(1)
    starts = re.search(r"thinking step starts: +\[([\d, ]*)\]", printed).group(1)
    assert changed.split(", ") == starts.split(", ")[1:], "SMI acts at every thinking step start but the first"
    deviation = float(re.search(r"largest deviation from the equation ([\d.e+-]+)", printed).group(1))
    assert deviation < 1e-6


@pinned_stack_only
@pytest.mark.slow
def test_correct_vs_wrong_notebook(tmp_path):
    printed, outputs = run_notebook("04_correct_vs_wrong.ipynb", tmp_path)
    assert "StudyResult(correct" in printed and "descriptive only" in printed
    folder = Path(re.search(r"written to (\S+)", printed).group(1))
    assert (folder / "report.html").exists()
    assert not list(tmp_path.iterdir()), "the notebook leaves nothing beside itself"
    shutil.rmtree(folder)
    assert any("image/png" in out.get("data", {}) for out in outputs)


@pinned_stack_only
@pytest.mark.slow
def test_what_matters_notebook(tmp_path):
    printed, outputs = run_notebook("05_what_matters.ipynb", tmp_path)
    assert "SuppressionMatrix(" in printed and "ReceiverHeads(" in printed and "AgreementSummary(" in printed
    assert "spearman" in printed and "largest change after" in printed and "knock out step" in printed
    assert not list(tmp_path.iterdir()), "the notebook leaves nothing beside itself"
    folder = Path(re.search(r"written to (\S+)", printed).group(1))
    assert (folder / "agreement.json").exists()
    shutil.rmtree(folder)
    assert sum("image/png" in out.get("data", {}) for out in outputs) >= 2


def test_notebooks_are_built_from_their_sources():
    """The .ipynb files are what build_notebooks.py writes (no stale copies, no stored outputs)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_notebooks", NOTEBOOKS / "build_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, cells in [("01_step_saliency.ipynb", module.STEP_SALIENCY),
                        ("02_layer_ablation.ipynb", module.LAYER_ABLATION),
                        ("03_stepflow.ipynb", module.STEPFLOW), ("04_correct_vs_wrong.ipynb", module.CORRECT_VS_WRONG),
                        ("05_what_matters.ipynb", module.WHAT_MATTERS)]:
        stored = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert [c.source for c in stored.cells] == [c.source for c in cells], name
        assert all(not c.get("outputs") for c in stored.cells if c.cell_type == "code")
