"""The documentation a newcomer reads works: every Python block of the README and of docs/ runs (in
order, one namespace per page, in a fresh folder), and every link and every path it names to a page
of ours resolves inside the repository."""

import ast
import re
import warnings
from pathlib import Path

import matplotlib
import pytest
from conftest import pinned_stack_only

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")  # [text](target)
DOC_PATH = re.compile(r"`((?:\.\./)*[\w./-]+\.(?:md|ipynb|py))`")  # `docs/method.md`, `../x/METHOD.md`, `oeb.py`


def python_blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


PAGES_WITH_CODE = [page for page in PAGES if python_blocks(page)]
NEEDS_VLLM = {"scale.md"}  # its examples run in the vLLM environment (tests/test_vllm.py)


def test_the_pages_with_code_are_found():
    names = {page.name for page in PAGES_WITH_CODE}
    assert {"README.md", "causal.md", "stepflow.md"} <= names


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_python_blocks_parse(page):
    for number, block in enumerate(python_blocks(page), 1):
        ast.parse(block, filename=f"{page.name}, block {number}")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_links_and_named_pages_resolve_inside_the_repository(page):
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        resolved = (page.parent / target).resolve()
        if not resolved.exists() or ROOT.resolve() not in resolved.parents:
            broken.append(target)
    for named in DOC_PATH.findall(text):
        candidates = [(base / named).resolve() for base in (page.parent, ROOT, ROOT / "stepsal")]
        found = any(c.exists() and ROOT.resolve() in c.parents for c in candidates)
        if (named.startswith("../") or not found) and ("/" in named or named.endswith(".md")):
            broken.append(named)  # (a bare module name, fast.py, is named in its section's context)
    assert not broken, f"{page.relative_to(ROOT)} names what is not in the repository: {broken}"


@pytest.mark.slow
@pinned_stack_only  # minutes: the model loads, generations and a small study of each page
@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda page: page.name)
def test_python_blocks_run(page, tmp_path, monkeypatch):
    if page.name in NEEDS_VLLM:
        pytest.skip(f"{page.name}'s examples run a vLLM engine: tests/test_vllm.py runs them in .venv-vllm")
    run_blocks(page, tmp_path, monkeypatch)


def run_blocks(page: Path, folder: Path, monkeypatch) -> dict:
    """Run a page's Python blocks in order, in one namespace, in ``folder``."""
    matplotlib.use("Agg")
    monkeypatch.chdir(folder)  # what the examples write lands here
    namespace: dict = {"__name__": "__docs__"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the examples' small studies warn that they are descriptive only
        for number, block in enumerate(python_blocks(page), 1):
            code = compile(block, f"{page.name}, block {number}", "exec")
            exec(code, namespace)  # the documentation's own examples
    assert "stepsal" in namespace
    return namespace
