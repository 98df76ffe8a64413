"""The package's shape: no import circles among dpsgd's modules, none hidden in a function."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dpsgd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _dpsgd_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dpsgd"):
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.startswith("dpsgd")]
    return []


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _module_level_imports(tree: ast.Module) -> list[str]:
    """Imports run when the module loads (an `if TYPE_CHECKING:` block never runs)."""
    found = []
    for node in tree.body:
        if _is_type_checking(node):
            continue
        for inner in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            found += _dpsgd_imports(inner)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): ast.parse(path.read_text()) for path in PACKAGE.rglob("*.py")}
    return {
        name: {
            target for target in _module_level_imports(tree) if target in modules and target != name
        }
        for name, tree in modules.items()
    }


def _cycle_from(start: str, graph: dict[str, set[str]]) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for target in graph[node]:
            if target == start:
                return path + [start]
            if target not in seen:
                seen.add(target)
                stack.append((target, path + [target]))
    return None


def test_no_module_of_dpsgd_imports_itself_through_others():
    graph = _graph()
    cycles = [cycle for name in sorted(graph) if (cycle := _cycle_from(name, graph))]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(cycle) for cycle in cycles[:5])


def test_no_function_imports_a_module_of_dpsgd():
    """An import inside a function hides a circle from the module graph; dpsgd has none."""
    hidden = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if _dpsgd_imports(inner):
                        hidden.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    assert not hidden, f"function-level imports of dpsgd modules: {hidden}"


def test_only_the_composition_root_sees_hydras_config():
    """Components read the typed `dpsgd.settings.Settings`; omegaconf stays at the root."""
    importers = sorted(
        str(path.relative_to(PACKAGE.parent))
        for path in PACKAGE.rglob("*.py")
        if any(
            (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("omegaconf"))
            or (isinstance(node, ast.Import) and any(a.name == "omegaconf" for a in node.names))
            for node in ast.walk(ast.parse(path.read_text()))
        )
    )
    assert importers == ["dpsgd/composition.py"]
