"""The package's layout rules, read from the source (``xmc/``, and ``kernels/`` installed as ``xmc.kernels``):
no import cycles between modules, kernels that import nothing from above them, no private names across
modules, and no source file over 600 lines without a reason at its top."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xmc"
MAX_LINES = 600
LONG_FILE_NOTE = "# Over 600 lines:"  # the first comment of a longer file starts so and says why


KERNELS = ROOT / "kernels"  # installed as xmc.kernels (pyproject.toml's package-dir)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":
        parts.insert(0, "xmc")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Every ``xmc`` module ``path`` imports, at module level or inside functions (a lazy import runs
    too): ``from a.b import c`` counts as ``a.b.c`` when that is a module of ``modules``, else ``a.b``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    return {m for m in found if m == "xmc" or m.startswith("xmc.")}


def package_files() -> list[Path]:
    """The package's source files: ``xmc/`` and ``kernels/``."""
    return [p for root in (PACKAGE, KERNELS) for p in root.rglob("*.py") if "__pycache__" not in p.parts]


def source_files() -> dict[str, Path]:
    return {module_name(p): p for p in package_files()}


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    return {
        name: {m for m in imports_of(path, set(files)) if m in files and m != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_kernels_import_nothing_from_outside_the_kernels():
    bad, modules = [], set(source_files())
    for path in KERNELS.rglob("*.py"):
        for module in imports_of(path, modules):
            if module != "xmc.kernels" and not module.startswith("xmc.kernels."):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, "; ".join(sorted(bad))


def test_no_private_name_crosses_a_module_boundary():
    """``from xmc.a import _helper`` means a helper that should be public, or live in a shared module."""
    bad = []
    for path in package_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("xmc"):
                bad += [
                    f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
    assert not bad, "; ".join(sorted(bad))


def test_long_source_files_say_why():
    long = []
    for path in sorted(package_files()):
        lines = path.read_text().splitlines()
        if len(lines) <= MAX_LINES:
            continue
        comments = [line.strip() for line in lines if line.strip().startswith("#")]
        if not comments or not comments[0].startswith(LONG_FILE_NOTE):
            long.append(f"{path.relative_to(ROOT)} ({len(lines)} lines)")
    assert not long, (
        f"over {MAX_LINES} lines without a first comment '{LONG_FILE_NOTE} <why>': split them, or say why: "
        + ", ".join(long)
    )
