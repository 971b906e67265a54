"""The house: no import cycle between any two modules of the product, and
no test module that another module imports.

import-linter (``make test``, contracts in pyproject.toml) holds the layers
between subpackages; this holds what layers cannot see: a cycle inside one
subpackage (lazy and ``TYPE_CHECKING`` imports count, as grimp reads them).
Tests share builders through helper modules named for what they hold
(``tests/http.py``, ``tests/archives.py`` ...), never through a test module.
"""

from __future__ import annotations

import grimp


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in sorted(graph.find_modules_directly_imported_by(module)):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_module_of_cachesvc_or_node_agent_is_part_of_an_import_cycle() -> None:
    graph = grimp.build_graph("cachesvc", "node_agent")
    assert _cycles(graph) == []


def test_no_module_imports_a_test_module() -> None:
    graph = grimp.build_graph("tests")
    tests = {m for m in graph.modules if m.rpartition(".")[2].startswith("test_")}
    imports = {
        (module, test) for test in tests for module in graph.find_modules_that_directly_import(test)
    }
    assert sorted(imports) == []
