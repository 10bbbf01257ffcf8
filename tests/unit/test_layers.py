"""Arrows one way (ARCHITECTURE.md): tasks -> decisions -> models, with the CLI above both.

Read from the source (every import, module-level or inside a function), not from what a
run happens to load: no circle anywhere in models/, orchestrator/ and workers/; the
decisions send Celery tasks by name (workers/broker.py), never importing the tasks or
the worker's app; models import neither of the others.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "orchestrator", "workers")
#: The CLI and what runs workers or commands for it: above both sides.
ABOVE = {"orchestrator.cli", "orchestrator.local", "orchestrator.demo"}
#: The worker's side: the tasks and what only they use.
TASK_SIDE = {"workers.app", "workers.tasks", "workers.watch", "workers.parts", "workers.completion",
             "workers.lease"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name].update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0 and node.module, f"{name}: a relative import; this check reads absolute ones"
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif node.module in modules:
                        graph[name].add(node.module)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, if there is any (depth-first search)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_graph_is_read() -> None:
    graph = _graph()
    assert len(graph) > 30 and TASK_SIDE <= graph.keys()
    # edges every version has: if these go missing, the graph reads nothing
    assert "workers.app" in graph["workers.tasks"] and "models.transitions" in graph["orchestrator.scheduler"]
    assert "orchestrator.scheduler" in _reachable(graph, "workers.tasks")  # tasks -> decisions


def test_no_import_circle() -> None:
    circle = _cycle(_graph())
    assert circle is None, " -> ".join(circle or [])


def test_decisions_reach_neither_the_tasks_nor_the_workers_app() -> None:
    graph = _graph()
    wrong = {name: sorted(_reachable(graph, name) & TASK_SIDE) for name in graph
             if name.startswith("orchestrator.") and name not in ABOVE and _reachable(graph, name) & TASK_SIDE}
    assert wrong == {}


def test_models_import_only_models() -> None:
    graph = _graph()
    wrong = {name: sorted(t for t in targets if not t.startswith("models"))
             for name, targets in graph.items() if name.startswith("models")}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_check_sees_a_circle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
