"""The package's layer rule, held by an AST read of every module under src/ftrecycle.

The rule (docs/architecture.md states the same, in words): components are stacked in LAYERS, bottom
first. A module may import a module of its own component (``ops.transfer`` -> ``ops._model``) or of a
lower layer, never a higher one, and never another component of its own layer. ``ftrecycle/__init__.py``
is the public API and may import anything; nothing imports the package root itself. The module-level
import graph has no cycles. A function-local import of an ftrecycle module is refused (it hides the
graph); a function-local import of anything else exists only to keep a heavy package (torch,
transformers, ...) off the ``ftrecycle transfer``/``--help`` path and says so in a trailing comment.

The checker is plain functions over a package directory, so the self-test can run it on a small
package written to tmp_path and show that it catches a back-edge, a cycle and an uncommented local import.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "ftrecycle"
SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Bottom first. Each entry is one layer; the names in it are components (the first dotted name under
# ftrecycle: a module or a subpackage). `errors` sits alone at the bottom because every other module,
# its old layer-mates dtypes and arch included, raises from it.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors",),
    ("dtypes", "arch", "distributed", "version"),
    ("io",),
    ("codecs",),
    ("options",),
    ("terms",),
    ("plan",),
    ("engine",),
    ("pipeline",),
    ("delta",),
    ("ops",),
    ("evaluate",),
    ("finetune",),
    ("diagnose",),
    ("recycle",),
    ("lab",),
    ("demo",),
    ("cli",),
    ("__main__",),  # `python -m ftrecycle`: runs the command line
)
LAYER_OF: dict[str, int] = {name: i for i, layer in enumerate(LAYERS) for name in layer}

CLI_MODULE_MAX_LINES = 300
FUNCTION_MAX_LINES = 80
# the lab's report writer lays out report.md as one long literal; the issue leaves it out of the limit
FUNCTION_LIMIT_EXEMPT = ("lab/report.py",)


@dataclass(frozen=True)
class Import:
    """One import statement's edge: ``source`` imports ``target``.

    Attributes:
        source: the importing module, e.g. ``ftrecycle.ops.transfer``.
        target: the imported module: an ftrecycle module name, ``ftrecycle`` for the package root, or
            the top-level name of anything else (``torch``).
        path: the importing file.
        line: the statement's first line.
        local: inside a function body.
        type_only: under ``if TYPE_CHECKING:`` (never executed, so no part of the runtime graph).
        commented: the statement's lines carry a ``#`` comment.
    """

    source: str
    target: str
    path: Path
    line: int
    local: bool
    type_only: bool
    commented: bool

    @property
    def internal(self) -> bool:
        """Whether the target is the package or one of its modules."""
        return self.target == PACKAGE or self.target.startswith(PACKAGE + ".")

    def where(self, root: Path) -> str:
        """``file:line`` relative to the package's parent directory."""
        return f"{self.path.relative_to(root.parent)}:{self.line}"


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the package at ``root``, by dotted name (a package by its ``__init__.py``)."""
    out: dict[str, Path] = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = f
    return out


def _comment_lines(source: str) -> set[int]:
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            lines.add(tok.start[0])
    return lines


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The modules one statement imports (an ftrecycle module name, or another package's top name)."""
    if isinstance(node, ast.Import):
        return [a.name if a.name.startswith(PACKAGE + ".") or a.name == PACKAGE else a.name.split(".")[0]
                for a in node.names]  # fmt: skip
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    if base != PACKAGE and not base.startswith(PACKAGE + "."):
        return [base.split(".")[0]]
    # `from ftrecycle.ops import transfer` imports the module ftrecycle.ops.transfer when there is one,
    # else a name of ftrecycle.ops; `from ftrecycle import transfer` (a function) is the package root
    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
    return list(dict.fromkeys(targets))  # `from m import a, b` is one edge to m


def imports_of(module: str, path: Path, known: set[str]) -> list[Import]:
    """Every import edge of one module, with where it sits (function-local, TYPE_CHECKING) and its comment."""
    text = path.read_text()
    comments = _comment_lines(text)
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, local: bool, type_only: bool) -> None:
        # a plain recursive walk that carries two flags down; it only appends to `found`
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            end = node.end_lineno or node.lineno
            commented = any(n in comments for n in range(node.lineno, end + 1))
            for target in _resolve(node, module, is_package, known):
                found.append(Import(module, target, path, node.lineno, local, type_only, commented))
            return
        inner_local = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, inner_local, True)
            for stmt in node.orelse:
                visit(stmt, inner_local, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, inner_local, type_only)

    visit(ast.parse(text, filename=str(path)), False, False)
    return found


def all_imports(root: Path) -> list[Import]:
    """The import edges of every module of the package at ``root``."""
    files = module_files(root)
    known = set(files)
    return [imp for name, f in files.items() for imp in imports_of(name, f, known)]


def component(module: str) -> str:
    """``ftrecycle.ops.transfer`` -> ``ops``."""
    return module.split(".")[1]


def layer_violations(imports: list[Import], root: Path, layer_of: dict[str, int]) -> list[str]:
    """Modules in no layer, then imports of the package root, of a higher layer or of another component
    of the same layer; each as one line naming the file, the line and the edge."""
    out: list[str] = []
    unplaced = sorted({component(m) for m in module_files(root) if m != PACKAGE} - set(layer_of))
    out += [f"{PACKAGE}.{c}: in no layer; add it to LAYERS in tests/test_layers.py" for c in unplaced]
    for imp in imports:
        if not imp.internal or imp.source == PACKAGE:  # the root __init__ is the public API facade
            continue
        if imp.target == PACKAGE:
            out.append(f"{imp.where(root)}: {imp.source} imports the package root {PACKAGE}; import the module")
            continue
        src, dst = component(imp.source), component(imp.target)
        if src == dst or src not in layer_of:
            continue
        if dst not in layer_of:
            out.append(f"{imp.where(root)}: {imp.source} -> {imp.target}: {PACKAGE}.{dst} is in no layer")
        elif layer_of[dst] > layer_of[src]:
            out.append(
                f"{imp.where(root)}: {imp.source} -> {imp.target}: back-edge, layer {layer_of[src]} ({src}) "
                f"imports layer {layer_of[dst]} ({dst})"
            )
        elif layer_of[dst] == layer_of[src]:
            out.append(
                f"{imp.where(root)}: {imp.source} -> {imp.target}: {src} and {dst} share layer {layer_of[src]} "
                "and may not import each other"
            )
    return out


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit on a deep graph)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp: list[str] = []
                while True:
                    top = stack.pop()
                    on_stack.discard(top)
                    comp.append(top)
                    if top == node:
                        break
                comps.append(sorted(comp))
    return comps


def _cycle_through(graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """One cycle inside a strongly connected set, as a path that ends where it starts."""
    start = min(members)
    path, seen, node = [start], {start}, start
    while True:
        node = min(n for n in graph[node] if n in members)  # every member has an edge inside the set
        if node in seen:
            return [*path[path.index(node) :], node]
        path.append(node)
        seen.add(node)


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The cycles of the module-level runtime import graph (TYPE_CHECKING and function-local imports
    left out), one per strongly connected group, each as ``[a, b, ..., a]``."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        graph.setdefault(imp.source, set())
        if imp.internal and not imp.local and not imp.type_only and imp.target != PACKAGE:
            graph[imp.source].add(imp.target)
            graph.setdefault(imp.target, set())
    cycles = []
    for comp in _strongly_connected(graph):
        if len(comp) > 1 or comp[0] in graph[comp[0]]:
            cycles.append(_cycle_through(graph, set(comp)))
    return cycles


def local_import_violations(imports: list[Import], root: Path) -> list[str]:
    """Function-local imports of ftrecycle modules, and uncommented function-local imports of anything."""
    out = []
    for imp in imports:
        if not imp.local:
            continue
        if imp.internal:
            out.append(f"{imp.where(root)}: {imp.source} imports {imp.target} inside a function; move it to the top")
        elif not imp.commented:
            out.append(
                f"{imp.where(root)}: {imp.source} imports {imp.target} inside a function without a comment; "
                "say why it is kept local (e.g. `# heavy: kept off the transfer path`) or move it to the top"
            )
    return out


def _report(title: str, lines: list[str]) -> str:
    return f"{len(lines)} {title}:\n  " + "\n  ".join(lines)


# ---- the real tree -----------------------------------------------------------------------------------


def test_imports_follow_the_layers() -> None:
    bad = layer_violations(all_imports(SRC), SRC, LAYER_OF)
    assert not bad, _report("imports break the layer rule (docs/architecture.md)", bad)


def test_no_import_cycles() -> None:
    cycles = import_cycles(all_imports(SRC))
    assert not cycles, _report("module-level import cycles", [" -> ".join(c) for c in cycles])


def test_function_local_imports_are_heavy_ones_with_a_reason() -> None:
    bad = local_import_violations(all_imports(SRC), SRC)
    assert not bad, _report("function-local imports to fix", bad)


def test_cli_modules_are_short() -> None:
    files = module_files(SRC)
    long = [
        f"{f.relative_to(SRC.parent)}: {n} lines"
        for name, f in files.items()
        if name == f"{PACKAGE}.cli" or name.startswith(f"{PACKAGE}.cli.")
        if (n := len(f.read_text().splitlines())) > CLI_MODULE_MAX_LINES
    ]
    assert not long, _report(f"cli modules over {CLI_MODULE_MAX_LINES} lines", long)


def long_functions(root: Path, limit: int, exempt: tuple[str, ...]) -> list[str]:
    """Functions (methods and nested ones included) longer than ``limit`` lines, outside ``exempt``."""
    out = []
    for f in module_files(root).values():
        rel = f.relative_to(root).as_posix()
        if rel in exempt:
            continue
        for node in ast.walk(ast.parse(f.read_text(), filename=str(f))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > limit:
                    out.append(f"{f.relative_to(root.parent)}:{node.lineno}: {node.name} is {n} lines")
    return out


def test_functions_are_short() -> None:
    long = long_functions(SRC, FUNCTION_MAX_LINES, FUNCTION_LIMIT_EXEMPT)
    assert not long, _report(f"functions over {FUNCTION_MAX_LINES} lines", long)


# ---- the checker on a package made to break every rule ----------------------------------------------

_BROKEN = {
    "__init__.py": "from ftrecycle.cli import main  # the facade may import anything\n",
    "errors.py": "from ftrecycle.io import reader\n",  # back-edge: layer 0 imports layer 2
    "dtypes.py": "from ftrecycle import arch\n",  # same layer, other component
    "arch.py": "from ftrecycle.errors import E\n",
    "io/__init__.py": "",
    "io/reader.py": "from ftrecycle.io import writer\n",
    "io/writer.py": "from . import reader\n",  # cycle reader -> writer -> reader, relative import
    "cli.py": (
        "import ftrecycle\n"  # the package root
        "def main():\n"
        "    import json\n"  # uncommented local import
        "    import torch  # heavy: kept off the transfer path\n"
        "    from ftrecycle.io import reader  # a local import of our own module\n"
    ),
    "extra.py": "",  # in no layer
}


def test_the_checker_reports_a_back_edge_a_cycle_and_an_uncommented_local_import(tmp_path: Path) -> None:
    root = tmp_path / PACKAGE
    for rel, text in _BROKEN.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    imports = all_imports(root)
    layers = layer_violations(imports, root, LAYER_OF)
    assert layers == [
        "ftrecycle.extra: in no layer; add it to LAYERS in tests/test_layers.py",
        "ftrecycle/cli.py:1: ftrecycle.cli imports the package root ftrecycle; import the module",
        "ftrecycle/dtypes.py:1: ftrecycle.dtypes -> ftrecycle.arch: dtypes and arch share layer 1 "
        "and may not import each other",
        "ftrecycle/errors.py:1: ftrecycle.errors -> ftrecycle.io.reader: back-edge, layer 0 (errors) "
        "imports layer 2 (io)",
    ], layers
    cycles = import_cycles(imports)
    assert cycles == [["ftrecycle.io.reader", "ftrecycle.io.writer", "ftrecycle.io.reader"]], cycles
    local = local_import_violations(imports, root)
    assert local == [
        "ftrecycle/cli.py:3: ftrecycle.cli imports json inside a function without a comment; say why it is "
        "kept local (e.g. `# heavy: kept off the transfer path`) or move it to the top",
        "ftrecycle/cli.py:5: ftrecycle.cli imports ftrecycle.io.reader inside a function; move it to the top",
    ], local
