"""The package's floor plan, as a new reader meets it: the tree is the pipeline (one wing per
stage), imports run one way (no cycle, function-local imports included), and modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "qlora_cli"
WINGS = {"recipe", "data", "model", "train", "evaluate", "merge", "export", "estimate", "cli"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imported_modules(path: Path, modules: set[str]) -> set[tuple[str, bool]]:
    """(qlora_cli module, imported inside a function) for every import in `path`."""
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    local = {id(node) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) for node in ast.walk(fn)}
    found = set()
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target:
                found.add((target, id(node) in local))
    return found


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str]]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph, local_imports = {}, []
    for name, path in files.items():
        graph[name] = set()
        for target, inside_function in imported_modules(path, set(files)):
            if target == name or name.startswith(target + "."):
                continue  # a package's own __init__ is not an edge
            graph[name].add(target)
            if inside_function:
                local_imports.append((name, target))
    return graph, local_imports


def find_cycle(graph: dict[str, set[str]]):
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycle_counting_function_local_imports():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_our_modules_are_imported_inside_functions_only_by_the_command_line():
    # The commands import the heavy wings (torch, transformers) when they run, so `qlora --help` and
    # `qlora estimate` stay fast; everywhere else our own modules are imported at the top.
    _, local_imports = import_graph()
    assert [pair for pair in local_imports if not pair[0].startswith("qlora_cli.cli.")] == []


def test_the_command_line_marks_each_deferred_import_with_its_reason():
    for path in (PACKAGE / "cli").glob("*.py"):
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if line.startswith("    ") and line.lstrip().startswith("from qlora_cli.") and not lines[index - 1].lstrip().startswith("from qlora_cli."):
                assert "imported when the command runs" in lines[index - 1], f"{path.name}:{index + 1} needs the reason comment"


def test_the_top_level_holds_the_wings_and_at_most_eight_modules():
    modules = sorted(path.name for path in PACKAGE.glob("*.py"))
    wings = {path.name for path in PACKAGE.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    assert wings == WINGS
    assert len(modules) <= 8, modules


def test_no_module_is_longer_than_400_lines():
    long = {str(path.relative_to(PACKAGE)): n for path in PACKAGE.rglob("*.py") if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_no_grab_bag_module():
    assert not [path for path in PACKAGE.rglob("*.py") if path.stem in ("utils", "helpers", "misc_utils", "common")]
