"""Data flows one way between gsops's subpackages: the import graph (read from the sources with ast,
every import, also those inside functions) has no cycle, and the backends import neither the ops
nor the reference (nn -> ops -> dispatch -> backends -> kernels)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "gsops"


def _unit(module: str) -> str:
    """gsops.<sub> for a module of a subpackage, else the top-level module's name."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else module


def subpackage_graph() -> dict:
    graph = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        src = _unit(module)
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [prefix] if node.module else [f"{prefix}.{a.name}" for a in node.names]
            for t in targets:
                u = _unit(t)
                real = u == "gsops.triton_kernels" or (ROOT.parent / u.replace(".", "/")).is_dir() or (ROOT.parent / (u.replace(".", "/") + ".py")).is_file()
                if t.startswith("gsops.") and real and u != src:
                    graph.setdefault(src, set()).add(u)
    return graph


def _cycle(graph):
    state = {}

    def visit(n, path):
        state[n] = 1
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path + [n, m]
            if m not in state:
                found = visit(m, path + [n])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [])
            if found:
                return found
    return None


def test_no_import_cycle_between_subpackages():
    graph = subpackage_graph()
    sub = {k: {v for v in vs if v.count(".") == 1} for k, vs in graph.items()}
    assert _cycle(sub) is None, f"cycle {_cycle(sub)} in {sub}"


def test_backends_import_neither_ops_nor_reference():
    graph = subpackage_graph()
    assert not graph.get("gsops.backends", set()) & {"gsops.ops", "gsops.reference", "gsops.nn", "gsops.adapters"}


if __name__ == "__main__":  # python tests/test_import_graph.py prints the graph
    for k, vs in sorted(subpackage_graph().items()):
        print(f"{k} -> {', '.join(sorted(vs))}")
