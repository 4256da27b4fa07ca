"""The import graph of the `pipeline` package, from its source (module-level and function-level imports alike).

    python tests/support/import_graph.py            # edges, one module per line, and any cycle
    python tests/support/import_graph.py ROOT       # another checkout's pipeline/ (e.g. an older commit in a worktree)

tests/test_imports.py asserts that the graph is acyclic and that imports only go down the layers below.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

# Top to bottom: a module may import only modules below it. Packages (tasks, bench) are one layer each; inside a
# package any import order is fine as long as there is no cycle.
LAYERS = [
    "pipeline",
    "cli",
    "runner",
    "workers",
    "bench",
    "recipe",
    "preflight",
    "job",
    "inference",
    "train",
    "evaluation",
    "checkpoint",
    "interop",
    "adapters",
    "lora",
    "model",
    "backbone",
    "tokenizer",
    "engine",
    "dept",
    "data",
    "summary",
    "sweep",
    "plots",
    "fingerprint",
    "tracking",
    "mlflow_record",
    "tasks",
    "metrics",
    "config",
    "options",
    "logs",
    "resources",
    "distributed",
    "atomic",
    "folder_lock",
    "cache",
    "faults",
    "interrupts",
    "errors",
    "_version",
]


REPO_ROOT = Path(__file__).resolve().parents[2]


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules) -> set[str]:
    """`pipeline.*` modules that `path` imports anywhere but under `if TYPE_CHECKING:`: `from pipeline import atomic`
    is an import of `pipeline.atomic`, `from pipeline.tasks import get_task` one of `pipeline.tasks`."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run: annotations only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "pipeline"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            if base.split(".")[0] != "pipeline":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in sorted((root / "pipeline").rglob("*.py"))}
    edges = {}
    for name, path in files.items():
        targets = {t for t in imports_of(path, name, files) if t in files and t != name}
        edges[name] = targets
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle found by depth-first search (enough to report one per strongly connected part)."""
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports that go up (or sideways between different layers' modules) in LAYERS."""
    bad = []
    for source, targets in edges.items():
        for target in targets:
            a, b = layer(source), layer(target)
            if a == b:
                continue  # inside a package: acyclicity is checked separately
            if a not in LAYERS or b not in LAYERS or LAYERS.index(b) <= LAYERS.index(a):
                bad.append((source, target))
    return sorted(bad)


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else REPO_ROOT
    edges = graph(root)
    for name in sorted(edges):
        print(f"{name} -> {', '.join(sorted(edges[name])) or '-'}")
    for cycle in cycles(edges):
        print("CYCLE: " + " -> ".join(cycle))
    for source, target in upward(edges):
        print(f"UPWARD: {source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
