"""The import graph (tests/import_graph.py) on small packages written here, then stepsal's own layering:
no import cycles, and no ``model: Any`` in its signatures."""

import textwrap
from pathlib import Path

import pytest
from import_graph import build_graph, find_cycles, format_cycles, main

STEPSAL = Path(__file__).resolve().parent.parent / "stepsal"


def write_package(root: Path, files: dict[str, str]) -> Path:
    """Writes {relative path: source} under root/pkg (each folder gets an __init__.py unless given)."""
    package = root / "pkg"
    for rel, source in files.items():
        path = package / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for folder in [package, *[p for p in package.rglob("*") if p.is_dir()]]:
        (folder / "__init__.py").touch()
    return package


def edges_of(package: Path) -> dict[str, set[str]]:
    return build_graph(package).edges


def test_a_cycle_through_an_import_inside_a_function_is_found(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from .b import helper\n",
        "b.py": """
            def helper():
                from .a import thing
                return thing
            """,
        "c.py": "from . import a\n",
    })
    graph = build_graph(package)
    cycles = find_cycles(graph)
    assert [c.nodes for c in cycles] == [["pkg.a", "pkg.b"]]
    assert str(cycles[0]) == "pkg.a -> pkg.b -> pkg.a"
    assert not cycles[0].import_time  # one edge is inside a function: it closes only on a call
    inside = [i for i in cycles[0].imports if i.in_function]
    assert [(i.source, i.target, i.function, i.line) for i in inside] == [("pkg.b", "pkg.a", "helper", 3)]
    assert "pkg/b.py:3 [in function helper]" in format_cycles(cycles)


def test_imports_in_methods_and_nested_functions_are_inside_functions(tmp_path):
    package = write_package(tmp_path, {
        "a.py": """
            class Thing:
                from .c import X  # a class body runs at import time

                def method(self):
                    def inner():
                        from .b import Y
            """,
        "b.py": "",
        "c.py": "",
    })
    imports = {i.target: i.function for i in build_graph(package).imports}
    assert imports == {"pkg.c": None, "pkg.b": "Thing.method.inner"}


def test_a_type_checking_import_is_not_an_edge(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from .b import B\n",
        "b.py": """
            import typing
            from typing import TYPE_CHECKING

            if TYPE_CHECKING:
                from .a import A
            else:
                from .c import C  # the else branch runs
            if typing.TYPE_CHECKING:
                from . import a

            def f():
                if TYPE_CHECKING:
                    from .a import A
            """,
        "c.py": "",
    })
    assert edges_of(package)["pkg.b"] == {"pkg.c"}
    assert find_cycles(build_graph(package)) == []


def test_from_dot_import_resolves_a_submodule_to_it_and_a_name_to_the_package(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "helper = 1\n",
        "sub.py": "",
        "user.py": "from . import sub, helper\n",
        "inner/deep.py": """
            from .. import sub as renamed
            from ..inner import other
            from pkg import helper
            import pkg.sub
            from pkg.inner.other import name
            """,
        "inner/other.py": "name = 1\n",
    })
    edges = edges_of(package)
    assert edges["pkg.user"] == {"pkg.sub", "pkg"}
    assert edges["pkg.inner.deep"] == {"pkg.sub", "pkg.inner.other", "pkg"}


def test_importing_a_submodule_is_no_edge_to_its_parent_packages(tmp_path):
    # pkg.inner's __init__ imports its own submodule: with parent edges it would be a cycle
    package = write_package(tmp_path, {
        "inner/__init__.py": "from .deep import f\n",
        "inner/deep.py": "def f():\n    pass\n",
        "user.py": "import pkg.inner.deep\nfrom .inner.deep import f\n",
    })
    edges = edges_of(package)
    assert edges["pkg.user"] == {"pkg.inner.deep"}
    assert edges["pkg.inner"] == {"pkg.inner.deep"}
    assert edges["pkg.inner.deep"] == set()
    assert find_cycles(build_graph(package)) == []


def test_no_cycles_gives_an_empty_list(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from .b import x\nimport os\nfrom collections import deque\n",
        "b.py": "from .c import y\nx = 1\n",
        "c.py": "y = 2\n",
    })
    assert find_cycles(build_graph(package)) == []


def test_a_self_import_and_a_three_module_cycle_are_both_found(tmp_path):
    package = write_package(tmp_path, {
        "__init__.py": "from . import name_defined_here\nname_defined_here = 1\n",
        "a.py": "from .b import x\n",
        "b.py": "from .c import x\n",
        "c.py": "from .a import x\n",
    })
    cycles = find_cycles(build_graph(package))
    assert [str(c) for c in cycles] == ["pkg -> pkg", "pkg.a -> pkg.b -> pkg.c -> pkg.a"]
    assert all(c.import_time for c in cycles)


def test_an_unparsable_tree_is_still_read(tmp_path):
    # the tool must work on a tree that cannot be imported: unknown third-party modules, a broken file
    package = write_package(tmp_path, {
        "a.py": "import not_installed_anywhere\nfrom .b import x\n",
        "b.py": "def broken(:\n",
        "c.py": "from .gone import y\n",
    })
    graph = build_graph(package)
    assert graph.edges["pkg.a"] == {"pkg.b"}
    assert len(graph.syntax_errors) == 1 and "b.py" in graph.syntax_errors[0]
    assert graph.edges["pkg.c"] == set()  # a module the tree lacks is no edge, but is listed
    assert graph.unresolved == [("pkg.c", 1, "from .gone import y")]


def test_the_script_prints_imports_and_cycles_and_exits_1_on_a_cycle(tmp_path, capsys):
    package = write_package(tmp_path, {
        "a.py": "from .b import helper\n",
        "b.py": "def helper():\n    from .a import thing\n",
    })
    assert main([str(package)]) == 1
    out = capsys.readouterr().out
    assert "-> pkg.a  (line 2)  [in function helper]" in out
    assert "    pkg.a -> pkg.b -> pkg.a\n" in out
    assert "imports inside functions: 1 statements" in out
    (package / "b.py").write_text("")
    assert main([str(package)]) == 0
    assert "no import cycles" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2


def test_stepsal_has_no_import_cycles():
    graph = build_graph(STEPSAL)
    assert len(graph.modules) > 20 and "stepsal.vis.figures" in graph.modules, graph.modules
    assert not graph.syntax_errors, "files that do not parse, so their imports are unchecked:\n" + "\n".join(
        graph.syntax_errors)
    cycles = find_cycles(graph)
    if cycles:
        pytest.fail(f"stepsal has {len(cycles)} import cycle(s) (`python tests/import_graph.py` prints the whole "
                    f"graph):\n" + format_cycles(cycles), pytrace=False)


def test_no_model_any_in_public_signatures():
    found = [f"{path.relative_to(STEPSAL.parent)}:{n}: {line.strip()}"
             for path in sorted(STEPSAL.rglob("*.py"))
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             for _ in range(line.count("model: Any"))]
    if found:
        pytest.fail(f"'model: Any' appears {len(found)} times in stepsal/ (type the model instead):\n"
                    + "\n".join(found), pytrace=False)

