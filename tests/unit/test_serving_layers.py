"""The serving package's layering: no import cycle among its modules (type-checking imports
included), and the data plane and everything under it never import a transport."""

import ast
from pathlib import Path

SERVING = Path(__file__).resolve().parents[2] / "serving"
TRANSPORTS = {"servicer", "oip_servicer", "oip_http", "server", "cli", "client", "healthcheck"}
UNDER_THE_PLANE = {
    "dataplane", "streams", "sessions", "sequences", "admission", "batcher", "stepper", "state", "model_store",
    "runtime", "cuda_state", "contract", "domain", "validation", "errors", "config", "metrics",
}  # fmt: skip


def imports() -> dict[str, set[str]]:
    """Module -> the serving modules it imports (at run time or for type checking)."""
    graph = {}
    for path in SERVING.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("serving"):
                parts = node.module.split(".")
                if len(parts) > 1:
                    found.add(parts[1])
                else:  # from serving import x
                    found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("serving.")}
        graph[path.stem] = {m for m in found if (SERVING / f"{m}.py").exists()} - {path.stem}
    return graph


def test_no_import_cycle_in_serving():
    graph, done, stack = imports(), set(), []

    def visit(module: str) -> None:
        if module in stack:
            raise AssertionError(f"import cycle: {' -> '.join([*stack[stack.index(module) :], module])}")
        if module in done:
            return
        stack.append(module)
        for dependency in sorted(graph[module]):
            visit(dependency)
        stack.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)


def test_the_data_plane_knows_no_transport():
    graph = imports()
    for module in UNDER_THE_PLANE:
        assert not graph[module] & TRANSPORTS, f"{module} imports {graph[module] & TRANSPORTS}"
        assert "proto" not in graph[module], f"{module} imports the generated stubs"
