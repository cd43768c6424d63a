"""The import layers of gsops, read from the source (ast; nothing is imported).

Every module of ``gsops/`` and of ``triton_kernels/`` (installed as ``gsops.triton_kernels``) is
parsed; each ``import`` / ``from ... import`` anywhere in it (module level or inside a function)
is an edge from its unit to the unit it names. A unit is a subpackage (``ops``, ``backends``,
``reference``, ``nn``, ``adapters``, ``methods``, ``models``, ``triton_kernels``), a top-level
module (``checks``, ``perm``, ``tolerances``, ``flags``, ...), or ``gsops`` itself (the package's
``__init__``, which re-exports the public names of every layer).

The layers, lowest first (STYLE.md, "Layers you can see"): the base modules; the kernels; the
backends; ops (one module per op: its reference, its custom ops, its dispatch); nn; methods;
adapters. ``reference`` is the oracle namespace: it re-exports the reference section of each op
module (and holds PEFT's own Cayley series), and reaches nothing above ops. A unit never reaches,
directly or through other units, a unit of a layer above it, and no two units import each other,
however indirectly.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# the modules every layer may use; they import only each other
BASE = {"checks", "flags", "perm", "tolerances", "logs", "_version"}

# (unit, units it must never reach)
NEVER = [
    # reference: the oracle namespace, re-exporting the reference section of each op module
    ("reference", {"nn", "methods", "adapters"}),
    ("triton_kernels", {"nn", "methods", "adapters", "ops"}),
    ("backends", {"nn", "methods", "adapters"}),  # backends -> ops: test_ops_and_backends_form_no_cycle
    ("ops", {"nn", "methods", "adapters"}),
    ("nn", {"methods", "adapters"}),
    ("methods", {"adapters"}),
]


def module_files() -> dict[str, Path]:
    """Module name -> file, for gsops/ and triton_kernels/ (as gsops.triton_kernels)."""
    mods = {}
    for p in sorted((ROOT / "gsops").rglob("*.py")):
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = p
    for p in sorted((ROOT / "triton_kernels").glob("*.py")):
        mods[".".join(["gsops", "triton_kernels"] + ([] if p.stem == "__init__" else [p.stem]))] = p
    return mods


def imports_of(source: str, module: str, is_package: bool, known) -> list[tuple[str, int]]:
    """(imported gsops module, line) for every import in ``source``, relative ones resolved.

    ``from pkg import name`` counts as importing ``pkg.name`` when that is a module (in
    ``known``, or ``gsops._C``), else as importing ``pkg``."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for a in node.names:
                full = f"{origin}.{a.name}"
                out.append((full if full in known or full == "gsops._C" else origin, node.lineno))
    return [(m, line) for m, line in out if m == "gsops" or m.startswith("gsops.")]


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "gsops"


def unit_graph() -> dict[tuple[str, str], list[str]]:
    """(from unit, to unit) -> the imports that make the edge ("gsops.x.y:LINE imports gsops.z")."""
    mods = module_files()
    edges: dict[tuple[str, str], list[str]] = {}
    for name, path in mods.items():
        for target, line in imports_of(path.read_text(), name, path.name == "__init__.py", mods):
            a, b = unit(name), unit(target)
            if a != b and b != "_C":  # gsops._C: the compiled extension, no source here
                edges.setdefault((a, b), []).append(f"{path.relative_to(ROOT)}:{line} imports {target}")
    return edges


GRAPH = unit_graph()
UNITS = sorted({u for e in GRAPH for u in e})


def reach(start: str, graph=GRAPH) -> dict[str, list[str]]:
    """Every unit reachable from ``start`` -> the path of imports that gets there."""
    paths = {start: []}
    todo = [start]
    while todo:
        a = todo.pop()
        for (x, b), why in sorted(graph.items()):
            if x == a and b not in paths:
                paths[b] = paths[a] + [why[0]]
                todo.append(b)
    return paths


def cycle_through(u: str, graph=GRAPH) -> list[str] | None:
    """A chain of imports from ``u`` back to ``u``, or None."""
    for (x, b), why in sorted(graph.items()):
        if x == u:
            back = reach(b, graph)
            if u in back:
                return [why[0]] + back[u]
    return None


def test_the_walker_finds_every_kind_of_import():
    """The graph is read right (else every other test here could pass on nothing)."""
    src = (
        "import gsops.ops\n"
        "from .. import reference as ref\n"
        "from ..backends import load\n"
        "from . import custom\n"
        "def f():\n"
        "    from gsops.nn import adapters\n"
        "import torch\n"
    )
    known = {"gsops.ops", "gsops.ops.custom", "gsops.reference", "gsops.backends", "gsops.nn", "gsops.nn.adapters"}
    got = imports_of(src, "gsops.ops.dispatch", False, known)
    assert got == [("gsops.ops", 1), ("gsops.reference", 2), ("gsops.backends", 3), ("gsops.ops.custom", 4),
                   ("gsops.nn.adapters", 6)]
    assert imports_of("from . import dispatch\n", "gsops.ops", True, {"gsops.ops.dispatch"}) == \
        [("gsops.ops.dispatch", 1)]
    # the real tree: the known edges of the data flow are there
    assert ("nn", "ops") in GRAPH and ("adapters", "nn") in GRAPH and ("ops", "checks") in GRAPH
    assert {"ops", "backends", "reference", "nn", "adapters", "triton_kernels"} <= set(UNITS)


@pytest.mark.parametrize("low, high", NEVER, ids=[low for low, _ in NEVER])
def test_a_layer_never_reaches_a_layer_above_it(low, high):
    paths = reach(low)
    bad = {u: paths[u] for u in sorted(high & set(paths))}
    assert not bad, f"{low} reaches {', '.join(bad)}:\n" + "\n".join(
        f"  {u}: " + " -> ".join(p) for u, p in bad.items())


def test_base_modules_import_only_each_other():
    bad = {(a, b): why for (a, b), why in GRAPH.items() if a in BASE and b not in BASE}
    assert not bad, "\n".join(f"{a} -> {b}: {why[0]}" for (a, b), why in sorted(bad.items()))


def test_no_module_imports_the_gsops_package_itself():
    """``gsops/__init__.py`` imports every layer to re-export it: a module that imports it back sits in
    a cycle with all of them. Version: gsops._version."""
    parents = reach("gsops")
    bad = {a: why for (a, b), why in GRAPH.items() if b == "gsops" and a in parents}
    assert not bad, "\n".join(f"{a}: {why[0]}" for a, why in sorted(bad.items()))


@pytest.mark.parametrize("u", [u for u in UNITS if u not in ("ops", "backends", "gsops")])
def test_no_import_cycle(u):
    """No unit is in an import cycle (ops and backends: the next test; the package itself: the one
    before). A cycle is looked for in the graph without the package's own re-exports."""
    graph = {e: w for e, w in GRAPH.items() if e[0] != "gsops"}
    chain = cycle_through(u, graph)
    assert chain is None, f"{u} imports itself back:\n  " + "\n  ".join(chain)


def test_ops_and_backends_form_no_cycle():
    """The dispatch (ops) decides which backend runs; a backend is a loader of kernels and knows
    nothing of ops: backends never reach ops, and neither is in a cycle."""
    graph = {e: w for e, w in GRAPH.items() if e[0] != "gsops"}
    assert "ops" not in reach("backends", graph), " -> ".join(reach("backends", graph)["ops"])
    for u in ("ops", "backends"):
        chain = cycle_through(u, graph)
        assert chain is None, f"{u} imports itself back:\n  " + "\n  ".join(chain)


def test_the_product_imports_none_of_its_test_tools():
    """tools/ (the CUDA emulator), perf/ and tests/ test the product from outside: gsops never imports them."""
    bad = []
    for name, path in module_files().items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[0] in ("tools", "perf", "tests")]
    assert not bad, "\n".join(bad)
