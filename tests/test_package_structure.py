"""The package's shape: no import cycles (function-level imports included), small modules."""
import ast
from pathlib import Path

import cap_lab

PACKAGE = Path(cap_lab.__file__).parent
MAX_LINES = 400


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """``{module: modules of cap_lab it imports}``, counting imports anywhere in the file.

    ``from cap_lab.x import y`` is an edge to ``cap_lab.x.y`` when that is a module, else to
    ``cap_lab.x``; the implicit import of a parent package is not an edge.
    """
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    edges.add(sub if sub in files else base)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_cap_lab_has_no_import_cycles():
    graph = import_graph()
    assert {"cap_lab.scoring.api", "cap_lab.modeling.replay", "cap_lab.cli"} <= graph.keys()
    assert "cap_lab.scoring.types" in graph["cap_lab.scoring.exact"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_only_the_modeling_layer_touches_transformers_internals():
    """Model internals (KV caches, the base model, decoder-layer calls) stay in cap_lab.modeling."""
    internals = ("base_model_prefix", "past_key_values", "batch_select_indices", "batch_repeat_interleave",
                 "register_forward_pre_hook", "cache_utils")
    offenders = [f"{p.relative_to(PACKAGE)}: {word}" for p in PACKAGE.rglob("*.py")
                 if "modeling" not in p.parts for word in internals
                 if word in p.read_text().replace("``" + word + "``", "")]  # docstrings may name them
    assert not offenders, offenders


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long
