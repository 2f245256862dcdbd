"""The rooms of the house, as the imports say them (README "Layout").

Every module of the tree is parsed (ast, nothing is imported) and its
imports are read wherever they are written: at the top, inside a function,
under ``if TYPE_CHECKING:``. Then:

- the pure core (``gateway.core``) imports only the wire contract, the
  standard library and itself: no I/O room, no clock of its own;
- the durable store (``gateway.store``) never imports the shell;
- nothing in the product imports the demo rig and test-bed (``demo``);
- the card protocols (``cards``) and the devices (``hardware``) import no
  part of the gateway;
- the core reads no clock (``now`` is an argument) and imports no I/O
  module of the standard library;
- no two modules import each other, directly or round a longer loop.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("gateway", "hq_bridge", "wire", "common", "hardware", "cards", "firmware")
TOOLING = ("demo", "tests", "bench")
OURS = PRODUCT + TOOLING
STDLIB = set(sys.stdlib_module_names) | {"__future__"}
# Third-party libraries the core may use because they are pure too: tables and arithmetic, no I/O, no clock.
PURE_LIBRARIES = {"lunardate"}   # lunar birthdays (gateway/core/points.py)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for top in OURS:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "node_modules" not in path.parts:
                found[module_name(path)] = path
    return found


MODULES = modules()


def _resolve(name: str) -> str:
    """The module an imported name lands in: ``gateway.core.pricing`` for
    ``from gateway.core import pricing``, the package for a name in it."""
    while name and name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(module: str, path: Path) -> set[str]:
    """Every module (ours: resolved to a module of the tree; others: the top
    name) that ``module`` imports, wherever in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module is in
                pkg = module.split(".") if is_package else module.split(".")[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            out.add(_resolve(name) if top in OURS else top)
    out.discard(module)
    return out


GRAPH = {m: imports_of(m, p) for m, p in MODULES.items()}


def in_room(module: str, room: str) -> bool:
    return module == room or module.startswith(room + ".")


def offenders(room: str, allowed) -> list[str]:
    return sorted(f"{m} imports {dep}" for m, deps in GRAPH.items() if in_room(m, room)
                  for dep in deps if not allowed(dep))


def test_the_tree_is_found():
    assert {"gateway.core.validate", "gateway.store.journal", "gateway.shell.service", "demo.rig",
            "cards.ntag424", "hardware.nfc"} <= set(MODULES)


def test_core_imports_only_the_wire_contract_the_standard_library_and_itself():
    pure_cards = ("cards.magstripe",)   # parsing only; member_qr / ntag424 hold keys and SQLite
    bad = offenders("gateway.core", lambda d: d in STDLIB or d in PURE_LIBRARIES or in_room(d, "wire")
                    or in_room(d, "gateway.core") or d in pure_cards)
    assert not bad, "the pure core reaches out of its room:\n" + "\n".join(bad)


IO_MODULES = {"os", "io", "sqlite3", "socket", "ssl", "asyncio", "pathlib", "shutil", "subprocess", "tempfile",
              "glob", "select", "selectors", "signal", "urllib", "http", "logging", "time"}
CLOCK_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("datetime", "today"), ("date", "today"),
               ("time", "time"), ("time", "time_ns"), ("time", "monotonic"), ("time", "perf_counter")}


def test_the_core_does_no_io_and_reads_no_clock():
    io = offenders("gateway.core", lambda d: d not in IO_MODULES)
    assert not io, "\n".join(io)
    reads = set()
    for m, path in MODULES.items():
        if not in_room(m, "gateway.core"):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and (node.func.value.id, node.func.attr) in CLOCK_CALLS:
                reads.add((m, f"{node.func.value.id}.{node.func.attr}"))
    assert not reads, f"the core reads a clock: {sorted(reads)}"


def test_the_store_never_imports_the_shell():
    bad = offenders("gateway.store", lambda d: not in_room(d, "gateway.shell"))
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("room", ["cards", "hardware", "wire", "common"])
def test_lower_rooms_import_no_part_of_the_gateway(room):
    bad = offenders(room, lambda d: not (in_room(d, "gateway") or in_room(d, "hq_bridge")))
    assert not bad, "\n".join(bad)


def test_the_product_never_imports_the_demo_or_the_tests():
    bad = sorted(f"{m} imports {d}" for m, deps in GRAPH.items() if m.split(".")[0] in PRODUCT
                 for d in deps if d.split(".")[0] in TOOLING)
    assert not bad, "\n".join(bad)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # A package imports its own modules to re-export them, and they import
    # their siblings by the package's name: that is the package, not a loop.
    graph = {m: {d for d in deps if d in MODULES and not (MODULES[d].name == "__init__.py" and in_room(m, d))}
             for m, deps in GRAPH.items()}
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other:\n" + "\n".join(" <-> ".join(c) for c in cycles)
