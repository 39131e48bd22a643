"""The import graph of the ``stepsal`` package, read from its source with ``ast``, and its cycles.

Run as a script::

    python tests/import_graph.py [path/to/stepsal]

prints, per module, the stepsal modules it imports (one line per import, marked ``[in function f]``
when the import sits inside a function or method), then every cycle, then how many imports sit inside
functions. The exit status is 1 when there is a cycle, 0 when there is none, 2 on a bad path.

Pure standard library, and it never imports stepsal: it works on a source tree that cannot even be
imported (a half-done refactoring, a baseline extracted with ``git archive``).

What the graph holds
--------------------
* Nodes are modules: ``stepsal.vis.figures``, ``stepsal.stepflow``, ... A package's ``__init__.py``
  is the package's own node (``stepsal/vis/__init__.py`` is ``stepsal.vis``). The package's name is
  the name of the folder given.
* An edge ``a -> b`` is an ``import`` / ``from ... import`` statement in ``a`` that names the stepsal
  module ``b``, absolute (``import stepsal.traces``, ``from stepsal.vis import html``) or relative
  (``from ..traces import Trace``), at module level or inside a function or method (an import inside
  a function runs on the first call; it still ties the two modules together, and a cycle through it
  is a cycle the layering should not have). Imports in a class body, a ``try`` or a plain ``if`` count
  as they are (they run at import time).
* ``from P import X``: when ``P.X`` is a module of the tree (a submodule or subpackage) the edge goes
  to ``P.X``; otherwise ``X`` is a name defined in ``P`` and the edge goes to ``P`` (its
  ``__init__``). ``from P import *`` is an edge to ``P``.
* Imports under ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) are not edges: they never run.
  Their ``else:`` branch does run, and counts.
* Dynamic imports (``importlib.import_module(...)``, ``__import__``) are not edges: their target
  is a run-time string. (stepsal's own ``__init__`` loads its public names this way, lazily.)
* Parent packages are NOT edges. Importing ``stepsal.a.b`` executes ``stepsal/__init__.py`` and
  ``stepsal/a/__init__.py`` first, so strictly every module "depends" on each package above it. Adding
  those edges would put every submodule that a package's ``__init__`` imports (``stepsal.stepflow``
  imports ``stepsal.stepflow.config``) in a cycle with its own ``__init__``, and every cycle report
  would be noise. The graph therefore records only the module each statement names; an import of
  ``stepsal.a.b`` is an edge to ``stepsal.a.b`` and not to ``stepsal.a`` nor ``stepsal``.
* A statement that names a stepsal module the tree does not have (a typo, a moved file, a relative
  import above the top package) is listed as unresolved, and is not an edge.

A cycle is a strongly connected component of more than one module, or a module that imports itself.
Each is shown as one closed walk through all its modules, ``a -> b -> c -> a`` (a walk may pass a
module twice when no single loop covers them all), followed by the imports that make its edges.
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Import:
    """One stepsal import: ``source`` imports ``target`` at ``path:line``."""

    source: str
    target: str
    path: str
    line: int
    function: str | None  # the enclosing function's qualified name; None at module level
    text: str  # the statement, as written (first line)

    @property
    def in_function(self) -> bool:
        return self.function is not None


@dataclass
class ImportGraph:
    package: str
    root: Path
    modules: dict[str, Path]  # module name -> file
    imports: list[Import] = field(default_factory=list)
    unresolved: list[tuple[str, int, str]] = field(default_factory=list)  # (module, line, statement)
    syntax_errors: list[str] = field(default_factory=list)

    @property
    def edges(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {m: set() for m in self.modules}
        for imp in self.imports:
            graph[imp.source].add(imp.target)
        return graph

    def imports_of(self, module: str) -> list[Import]:
        return sorted((i for i in self.imports if i.source == module), key=lambda i: i.line)

    def function_imports(self) -> list[Import]:
        return [i for i in self.imports if i.in_function]


@dataclass
class Cycle:
    nodes: list[str]  # sorted
    walk: list[str]  # closed: walk[0] == walk[-1]
    imports: list[Import]  # the imports whose both ends lie in the cycle

    def __str__(self) -> str:
        return " -> ".join(self.walk)

    @property
    def import_time(self) -> bool:
        """Whether the cycle closes with module-level imports alone (it then bites at import time)."""
        module_level = {}
        for imp in self.imports:
            if not imp.in_function:
                module_level.setdefault(imp.source, set()).add(imp.target)
        return bool(_sccs(module_level, self.nodes, cyclic_only=True))


def module_name(package: str, root: Path, file: Path) -> str:
    parts = list(file.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def discover(root: Path) -> dict[str, Path]:
    root = root.resolve()
    package = root.name
    modules = {}
    for file in sorted(root.rglob("*.py")):
        rel = file.relative_to(root)
        if any(not p.isidentifier() for p in rel.with_suffix("").parts):
            continue  # not importable (a hyphenated script, __pycache__ ...)
        modules[module_name(package, root, file)] = file
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    if isinstance(test, ast.Attribute):
        return test.attr == "TYPE_CHECKING"
    return False


class _Collector(ast.NodeVisitor):
    """Collects every import statement that runs, with its enclosing function (if any)."""

    def __init__(self) -> None:
        self.found: list[tuple[ast.Import | ast.ImportFrom, str | None]] = []
        self.scope: list[str] = []  # class and function names
        self.function_depth = 0

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda, name: str) -> None:
        for deco in getattr(node, "decorator_list", []):
            self.visit(deco)  # decorators run where the def is
        self.scope.append(name)
        self.function_depth += 1
        for child in (node.body if isinstance(node.body, list) else [node.body]):
            self.visit(child)
        self.function_depth -= 1
        self.scope.pop()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._function(node, node.name)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._function(node, node.name)

    def visit_Lambda(self, node: ast.Lambda) -> None:
        self._function(node, "<lambda>")

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        for expr in [*node.decorator_list, *node.bases, *node.keywords]:
            self.visit(expr)
        self.scope.append(node.name)
        for child in node.body:
            self.visit(child)
        self.scope.pop()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _record(self, node: ast.Import | ast.ImportFrom) -> None:
        self.found.append((node, ".".join(self.scope) if self.function_depth else None))

    visit_Import = _record
    visit_ImportFrom = _record


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module a dotted name stands for, or None when the tree has no such module."""
    return name if name in modules else None


def _targets(node: ast.Import | ast.ImportFrom, source: str, is_package: bool, modules: dict[str, Path],
             package: str) -> tuple[list[str], bool]:
    """The stepsal modules a statement imports, and whether it names stepsal without resolving."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names if alias.name.split(".")[0] == package]
        targets = [_resolve(n, modules) for n in names]
        return [t for t in targets if t], any(t is None for t in targets)
    if node.level:
        here = source.split(".") if is_package else source.split(".")[:-1]
        if node.level - 1 > len(here) - 1:
            return [], True  # beyond the top-level package
        base = here[: len(here) - (node.level - 1)]
        base_name = ".".join(base + ([node.module] if node.module else []))
    else:
        if not node.module or node.module.split(".")[0] != package:
            return [], False
        base_name = node.module
    targets = []
    unresolved = False
    for alias in node.names:
        sub = f"{base_name}.{alias.name}"
        if alias.name != "*" and sub in modules:
            targets.append(sub)
            continue
        target = _resolve(base_name, modules)
        if target is None:
            unresolved = True
        else:
            targets.append(target)
    return targets, unresolved


def build_graph(root: str | Path) -> ImportGraph:
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder")
    modules = discover(root)
    package = root.name
    graph = ImportGraph(package=package, root=root, modules=modules)
    for module, file in modules.items():
        source_text = file.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source_text, filename=str(file))
        except SyntaxError as error:
            graph.syntax_errors.append(f"{file}:{error.lineno}: {error.msg}")
            continue
        collector = _Collector()
        collector.visit(tree)
        is_package = file.name == "__init__.py"
        lines = source_text.splitlines()
        for node, function in collector.found:
            targets, unresolved = _targets(node, module, is_package, modules, package)
            text = lines[node.lineno - 1].strip() if node.lineno <= len(lines) else ""
            if unresolved:
                graph.unresolved.append((module, node.lineno, text))
            for target in dict.fromkeys(targets):
                graph.imports.append(Import(module, target, str(file.relative_to(root.parent)), node.lineno,
                                            function, text))
    return graph


def _sccs(graph: dict[str, set[str]], nodes: list[str] | None = None, cyclic_only: bool = False) -> list[list[str]]:
    """Tarjan's strongly connected components (iterative), restricted to ``nodes`` when given."""
    allowed = set(graph) | {t for ts in graph.values() for t in ts} if nodes is None else set(nodes)
    succ = {n: sorted(t for t in graph.get(n, ()) if t in allowed) for n in allowed}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []
    counter = 0
    for start in sorted(allowed):
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = counter
                counter += 1
                stack.append(node)
                on_stack.add(node)
            recurse = False
            for j in range(i, len(succ[node])):
                nxt = succ[node][j]
                if nxt not in index:
                    work.append((node, j + 1))
                    work.append((nxt, 0))
                    recurse = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if recurse:
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    component.append(top)
                    if top == node:
                        break
                out.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    if cyclic_only:
        out = [c for c in out if len(c) > 1 or c[0] in succ[c[0]]]
    return out


def _shortest_path(succ: dict[str, list[str]], start: str, goals: set[str]) -> list[str]:
    """Breadth-first path from start to the nearest node of goals, by at least one edge."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen: set[str] = set()
    while queue:
        node = queue.popleft()
        for nxt in succ[node]:
            if nxt in seen:
                continue
            seen.add(nxt)
            previous[nxt] = node
            if nxt in goals:
                path = [nxt, node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            queue.append(nxt)
    raise ValueError(f"no path from {start} to {sorted(goals)}")


def _shortest_closed_walk(succ: dict[str, list[str]], nodes: list[str]) -> list[str]:
    """The shortest closed walk from nodes[0] through every node: breadth-first over (node, seen set)."""
    bit = {n: 1 << i for i, n in enumerate(nodes)}
    full = (1 << len(nodes)) - 1
    start = (nodes[0], bit[nodes[0]])
    previous: dict[tuple[str, int], tuple[str, int]] = {}
    queue = deque([start])
    while queue:
        state = queue.popleft()
        node, seen = state
        for nxt in succ[node]:
            after = (nxt, seen | bit[nxt])
            if after in previous or after == start:
                continue
            previous[after] = state
            if after == (nodes[0], full):
                walk = [after]
                while walk[-1] != start:
                    walk.append(previous[walk[-1]])
                return [n for n, _ in reversed(walk)]
            queue.append(after)
    raise ValueError("not strongly connected")


def _closed_walk(graph: dict[str, set[str]], nodes: list[str]) -> list[str]:
    """A closed walk through every node of a strongly connected component: the shortest for up to 12
    nodes, a greedy one (nearest unvisited node next) beyond."""
    inside = set(nodes)
    succ = {n: sorted(t for t in graph[n] if t in inside) for n in nodes}
    start = nodes[0]
    if len(nodes) == 1:
        return [start, start]
    if len(nodes) <= 12:
        return _shortest_closed_walk(succ, nodes)
    walk = [start]
    missing = inside - {start}
    while missing:
        path = _shortest_path(succ, walk[-1], missing)
        walk += path[1:]
        missing -= set(path)
    walk += _shortest_path(succ, walk[-1], {start})[1:]
    return walk


def find_cycles(graph: ImportGraph) -> list[Cycle]:
    edges = graph.edges
    cycles = []
    for component in _sccs(edges, cyclic_only=True):
        inside = set(component)
        imports = sorted((i for i in graph.imports if i.source in inside and i.target in inside),
                         key=lambda i: (i.source, i.line, i.target))
        cycles.append(Cycle(component, _closed_walk(edges, component), imports))
    return sorted(cycles, key=lambda c: c.nodes)


def format_cycles(cycles: list[Cycle]) -> str:
    """The cycles with the imports that make them, for a report or a test's failure message."""
    lines = []
    for n, cycle in enumerate(cycles, 1):
        when = "closes at import time" if cycle.import_time else "closes only through imports inside functions"
        lines.append(f"cycle {n}: {cycle}")
        lines.append(f"    ({len(cycle.nodes)} modules; {when}; the imports that form it:)")
        for imp in cycle.imports:
            where = f"in function {imp.function}" if imp.in_function else "module level"
            lines.append(f"    {imp.source} -> {imp.target}    {imp.path}:{imp.line} [{where}]  {imp.text}")
    return "\n".join(lines)


def report(graph: ImportGraph, cycles: list[Cycle]) -> str:
    lines = [f"import graph of {graph.package} ({graph.root}): {len(graph.modules)} modules, "
             f"{len(graph.imports)} imports of {graph.package} modules", ""]
    for module in graph.modules:
        imports = graph.imports_of(module)
        lines.append(f"{module}" + ("" if imports else "  (imports no stepsal module)"))
        for imp in imports:
            mark = f"  [in function {imp.function}]" if imp.in_function else ""
            lines.append(f"    -> {imp.target}  (line {imp.line}){mark}")
    if graph.unresolved:
        lines += ["", "unresolved stepsal imports (no such module in the tree):"]
        lines += [f"    {m} line {line}: {text}" for m, line, text in graph.unresolved]
    if graph.syntax_errors:
        lines += ["", "files that do not parse (their imports are missing above):"]
        lines += [f"    {e}" for e in graph.syntax_errors]
    lines.append("")
    if cycles:
        lines.append(f"{len(cycles)} import cycle(s):")
        lines += [f"    {cycle}" for cycle in cycles]
        lines += ["", format_cycles(cycles)]
    else:
        lines.append("no import cycles")
    function_imports = graph.function_imports()
    statements = {(i.source, i.line) for i in function_imports}
    lines += ["", f"imports inside functions: {len(statements)} statements ({len(function_imports)} module edges) "
                  f"in {len({i.source for i in function_imports})} modules"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0] in {"-h", "--help"}):
        print(__doc__)
        return 0 if args and args[0] in {"-h", "--help"} else 2
    root = Path(args[0]) if args else Path(__file__).resolve().parent.parent / "stepsal"
    try:
        graph = build_graph(root)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    cycles = find_cycles(graph)
    print(report(graph, cycles))
    return 1 if cycles else 0


if __name__ == "__main__":
    sys.exit(main())
